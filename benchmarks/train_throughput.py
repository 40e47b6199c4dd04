"""Training throughput of CLAM at the EK100 config: the step, the loader, both together, where the
step's time goes, and data-parallel scaling, in one run.

Usage:
  python3 benchmarks/train_throughput.py                           # one GPU, every part
  NCCL_NVLS_ENABLE=0 python3 benchmarks/train_throughput.py --parts scaling         # all GPUs
  JAX_PLATFORMS=cpu python3 benchmarks/train_throughput.py --quick                 # CPU, tiny

Parts (--parts, comma-separated; default all):
  step        train_lib's jitted train_step on device-resident random batches of the EK100 shape
              (B = 256, T = 128 frames = 32 s at 4 fps, rgb 1024) with config.model.dtype float32
              and bfloat16 (params and optimizer state are float32 either way), and bfloat16 with
              the processor's selective scan forced to the associative-scan reference (what ran
              before the Pallas kernels; the memory's scan unchanged): median step
              time, samples/s, time of one EK100 epoch (67,217 samples), and from the compiled
              step (`.lower(...).compile()`) XLA's cost analysis (flops, bytes accessed) and
              memory analysis (argument + output bytes, temporaries). MFU = flops / step time /
              peak, the peak picked from device_kind (H100 SXM / H200: dense bf16 989 TFLOP/s;
              TF32 494 for float32, whose matmuls run on TF32 at JAX's default precision).
              Floors: flops / peak; bytes accessed / copy bandwidth (measured here: the compiled
              program's traffic at full bandwidth); I/O bytes / copy bandwidth (each argument
              read and each output written once: a perfectly fused step). "model" flops are 3x
              the forward's (no recomputation). XLA counts no flops inside Pallas kernels (the
              memory's scan on GPU), a small part of the total.
  loader      clam_jax.data.pipeline.make_loader alone over an EK100-layout dataset written by
              clam_jax/data/synthetic.py (RULSTM LMDB of 1024-d float32 rows, 30 fps keys) into a
              temporary folder (page cache warm), for each of --workers: samples/s; and the
              host-to-device copy of one batch (train_lib.Parallel.shard_batch).
  pipeline    the bfloat16 step fed by that loader (the loader part's fastest --workers, else
              the largest): inline, as train_and_evaluate feeds it (the next batch read and
              copied after the step is dispatched), and put ahead (a candidate: the next batches
              read and copied to the device by grain's background-thread prefetch while the step
              runs; its one GPU run, session 10, did not finish in ~110 s at 16 workers):
              samples/s.
  components  forward + backward of each part of the bfloat16 model alone, on inputs of the shapes
              it gets in the step (input projection, processor, memory, predictor, classifiers +
              loss), the optimizer update, and one processor layer's selective scan
              (ssm.selective_scan) by the associative scan and by the Pallas kernels: ms, share
              of the step, and
              each program's flops and bytes floors.
  scaling     the bfloat16 step on 1 device and on --devices devices (default all local ones;
              train_lib.Parallel): the global batch split over the devices (strong) and the
              batch on every device (weak): samples/s and speed-up over 1 device.

--quick: tiny model and shapes (B = 8, T = 32, d_model 64) for a CPU; its numbers only show that
the script works. Prints the measurements as it goes, a summary table last, and writes every number
to --out (JSON). Parts that fail (e.g. out of device memory) are reported and the run goes on.
Setting JAX_COMPILATION_CACHE_DIR lets a second run on the same machine skip the compiles.
"""

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clam_jax import model as model_lib  # noqa: E402
from clam_jax import ssm  # noqa: E402
from clam_jax import train_lib  # noqa: E402
from clam_jax.data import pipeline  # noqa: E402
from clam_jax.data import synthetic  # noqa: E402
from configs import ek100  # noqa: E402

EPOCH_SAMPLES = 67_217  # EK100 training segments (the count)
PARTS = ("step", "loader", "pipeline", "components", "scaling")
# Dense tensor-core peaks (vendor datasheets, SXM): {name in device_kind: (bfloat16, tf32)}.
PEAKS = {"H100": (989e12, 494e12), "H200": (989e12, 494e12)}


def get_config(args, dtype):
  """configs/ek100.py with model.dtype = dtype; --quick shrinks the model and the window."""
  config = ek100.get_config()
  config.model.dtype = dtype
  if args.quick:
    config.model.update(d_model=64, processor_layers=2, memory_layers=1, memory_heads=4,
                        predictor_layers=1, predictor_heads=4)
    config.data.update(obs_seconds=8.0, batch_size=8)
  config.data.batch_size = args.batch_size or config.data.batch_size
  return config


def peak_flops(dtype):
  """(peak flops/s of dtype's matmuls or None, a line saying which peak)."""
  kind = jax.devices()[0].device_kind
  for name, (bf16, tf32) in PEAKS.items():
    if name in kind and "PCIe" not in kind and "NVL" not in kind:
      peak, unit = (bf16, "bf16") if dtype == "bfloat16" else (tf32, "tf32")
      return peak, f"{kind}: {name} SXM dense {unit} {peak / 1e12:.0f} TFLOP/s"
  return None, f"{kind}: no known peak, MFU not computed"


def bench(fn, *args, reps=5):
  """Median seconds of fn(*args) after one warm-up call (compiled already)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def copy_bandwidth(quick):
  """Device copy bandwidth, bytes read + written per second, of an elementwise pass."""
  x = jnp.ones((1 << (22 if quick else 28),), jnp.float32)  # 16 MiB / 1 GiB
  return 2 * x.nbytes / bench(jax.jit(lambda x: x * 1.0001), x, reps=10)


def window_frames(config):
  return round(config.data.obs_seconds * config.data.fps)


def random_batch(config, batch_size, rng):
  """Host batch as train_lib.model_inputs gives it: features {m: (B, T, F_m)} float32, mask (B, T)
  (windows left-padded by up to T / 4 frames), random targets, -1 on padding frames."""
  t, f = window_frames(config), config.model.future_queries
  mask = np.arange(t) >= rng.integers(0, t // 4, batch_size)[:, None]
  features = {name: rng.standard_normal((batch_size, t, dim), np.float32) * mask[..., None]
              for name, dim in config.model.modalities.items()}
  heads = config.model.heads
  return {"features": features, "mask": mask,
          "future_targets": {h: rng.integers(0, c, (batch_size, f)).astype(np.int32)
                             for h, c in heads.items()},
          "past_targets": {h: np.where(mask, rng.integers(0, c, (batch_size, t)), -1).astype(
              np.int32) for h, c in heads.items()}}


def cost(compiled):
  """{"flops", "bytes", "io_bytes", "temp_bytes"} of a compiled program (None where unknown)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per program
    analysis = analysis[0]
  analysis = analysis or {}
  memory = compiled.memory_analysis()
  io = None if memory is None else memory.argument_size_in_bytes + memory.output_size_in_bytes
  return {"flops": analysis.get("flops"), "bytes": analysis.get("bytes accessed"),
          "io_bytes": io, "temp_bytes": None if memory is None else memory.temp_size_in_bytes}


def floors(costs, peak, bandwidth):
  """Floors in ms: flops / peak, bytes accessed / bandwidth, I/O bytes / bandwidth."""
  div = lambda a, b: None if a is None or b is None else 1e3 * a / b
  return {"floor_flops_ms": div(costs["flops"], peak),
          "floor_bytes_ms": div(costs["bytes"], bandwidth),
          "floor_io_ms": div(costs["io_bytes"], bandwidth)}


class Setup:
  """A model, optimizer, train state and batch of a config on a Parallel; compile() makes the
  jitted train step. scan: None, or an ssm.SCAN_IMPLEMENTATIONS name forced on the processor's
  selective scan while the step is traced (config.model.scan_impl also picks the memory's)."""

  def __init__(self, config, parallel, batch_size, seed=0, scan=None):
    self.config, self.parallel, self.batch_size = config, parallel, batch_size
    self.scan = scan
    self.model = model_lib.CLAM(config.model)
    steps_per_epoch = EPOCH_SAMPLES / batch_size
    self.tx, _ = train_lib.make_optimizer(config.optimizer, steps_per_epoch,
                                          int(config.train.num_epochs * steps_per_epoch))
    self.host_batch = random_batch(config, batch_size, np.random.default_rng(seed))
    example = jax.tree.map(lambda x: x[:1], self.host_batch)
    init = functools.partial(train_lib.create_train_state, self.model, self.tx, example)
    self.state = jax.jit(init, out_shardings=parallel.replicated)(jax.random.key(seed))
    self.batch = parallel.shard_batch(self.host_batch)
    self.key = jax.random.key(seed + 1)
    self.step = None

  def compile(self):
    original = ssm.selective_scan
    if self.scan:  # MambaBlock looks selective_scan up when traced
      ssm.selective_scan = lambda *a, implementation, **k: original(*a, implementation=self.scan, **k)
    try:
      start = time.perf_counter()
      self.step = self.parallel.train_step(self.config.loss).lower(
          self.state, self.batch, self.key).compile()
      self.compile_s = time.perf_counter() - start
      apply = lambda params, batch, key: self.model.apply(
          {"params": params}, batch["features"], batch["mask"], train=True, rngs={"dropout": key})
      analysis = jax.jit(apply).lower(self.state.params, self.batch, self.key).cost_analysis()
      # The forward's flops (XLA's analysis of the lowered program) x 3: no recomputation.
      self.model_flops = 3 * (analysis[0] if isinstance(analysis, list) else analysis or {}).get(
          "flops", 0.0)
    finally:
      ssm.selective_scan = original

  def time_steps(self, steps, repeats):
    """Median seconds per step over `repeats` runs of `steps` back-to-back steps (dispatched
    without host syncs, as the training loop does), after two warm-up steps."""
    for _ in range(2):
      self.state, metrics = self.step(self.state, self.batch, self.key)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.batch, self.key)
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def measure_step(setup, args, bandwidth, with_costs=True):
  """One row of the step table for a Setup (compiled here if it is not yet)."""
  if setup.step is None:
    setup.compile()
  seconds = setup.time_steps(args.steps, args.repeats)
  row = {"dtype": setup.config.model.dtype, "devices": len(setup.parallel.mesh.devices),
         "global_batch": setup.batch_size, "compile_s": setup.compile_s, "step_ms": 1e3 * seconds,
         "samples_per_s": setup.batch_size / seconds,
         "epoch_s": EPOCH_SAMPLES / setup.batch_size * seconds}
  if with_costs:
    peak, peak_name = peak_flops(row["dtype"])
    row.update(cost(setup.step), model_flops=setup.model_flops, peak_name=peak_name)
    row.update(floors(row, peak, bandwidth))
    for name, flops in (("mfu", row["flops"]), ("mfu_model", row["model_flops"])):
      row[name] = None if peak is None or not flops else flops / seconds / peak
  print("step " + json.dumps(row), flush=True)
  return row


# ---------------------------------------------------------------------------------------------
# Loader


def dataset_config(config, root, batches):
  """The data config of a synthetic EK100-layout dataset under root with about batches *
  batch_size training windows (written by synthetic.write_synthetic_ek100, or make_loader, on
  first use)."""
  episodes = 4 if config.data.batch_size < 64 else 16
  per_video = episodes * (6 + 2)  # synthetic's default steps_per_episode + cue + finale
  params = dict(num_videos=-(-batches * config.data.batch_size // per_video) + 2,
                num_validation_videos=1, episodes_per_video=episodes,
                feature_dim=config.model.modalities["rgb"])
  data = config.data.copy_and_resolve_references()
  data.update(name="synthetic", root=root, synthetic=params)
  return data


def warm_up_batches(workers):
  """Batches read before timing: the workers' first batches, ready at once after the slowest
  worker's start, would otherwise be counted (session 10: "2.7 M samples/s" at 16 workers)."""
  return 2 * workers + 2


def time_loader(data, workers, batches, budget_s=15.0):
  """(samples/s over up to max(batches, 2 workers) batches after warm_up_batches (fewer once
  budget_s has passed, at least 2), seconds to the first batch)."""
  start = time.perf_counter()
  iterator = iter(pipeline.make_loader(data, "train", shuffle=True, num_epochs=None,
                                       worker_count=workers))
  next(iterator)
  first = time.perf_counter() - start
  for _ in range(warm_up_batches(workers) - 1):
    next(iterator)
  start = time.perf_counter()
  for count in range(1, max(batches, 2 * workers) + 1):
    next(iterator)
    if count >= 2 and time.perf_counter() - start > budget_s:
      break
  rate = count * data.batch_size / (time.perf_counter() - start)
  if workers:
    iterator.close()
  return rate, first


def part_loader(args, data, parallel):
  rows = []
  for workers in args.workers:
    rate, first = time_loader(data, workers, args.loader_batches)
    rows.append({"workers": workers, "samples_per_s": rate, "first_batch_s": first,
                 "epoch_s": EPOCH_SAMPLES / rate})
    print("loader " + json.dumps(rows[-1]), flush=True)
  batch = train_lib.model_inputs(next(iter(pipeline.make_loader(
      data, "train", shuffle=False, num_epochs=1, worker_count=0))))
  seconds = bench(lambda: parallel.shard_batch(batch), reps=3)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(batch))
  copy = {"bytes": nbytes, "ms": 1e3 * seconds, "gb_per_s": nbytes / seconds / 1e9}
  print("host_to_device " + json.dumps(copy), flush=True)
  return {"rows": rows, "host_to_device": copy}


def part_pipeline(args, data, setup, workers):
  """The step fed by the loader with `workers` workers, two ways: "inline", as train_and_evaluate
  feeds it (the next batch read and copied to the device after the step is dispatched), and "put
  ahead", a candidate (grain's background-thread prefetch, as grain.experimental.device_put,
  reading and copying the next batches while the step runs). Returns a row per feed."""
  shard = lambda batch: setup.parallel.shard_batch(train_lib.model_inputs(batch))
  rows = []
  for feed in ("inline", "put ahead"):
    loader = pipeline.make_loader(data, "train", shuffle=True, num_epochs=None,
                                  worker_count=workers)
    if feed == "put ahead":
      loader = grain.experimental.ThreadPrefetchIterDataset(
          grain.experimental.ThreadPrefetchIterDataset(loader, prefetch_buffer_size=1)
          .map(lambda batch: (batch, shard(batch))), prefetch_buffer_size=2)
    iterator = iter(loader)
    next_batch = ((lambda: next(iterator)[1]) if feed == "put ahead" else
                  (lambda: shard(next(iterator))))
    for _ in range(warm_up_batches(workers)):
      setup.state, metrics = setup.step(setup.state, next_batch(), setup.key)
    jax.block_until_ready(metrics)
    steps = args.loader_batches
    start = time.perf_counter()
    for _ in range(steps):
      setup.state, metrics = setup.step(setup.state, next_batch(), setup.key)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    iterator.close()
    row = {"feed": feed, "workers": workers, "dtype": setup.config.model.dtype,
           "step_ms": 1e3 * seconds, "samples_per_s": setup.batch_size / seconds,
           "epoch_s": EPOCH_SAMPLES / setup.batch_size * seconds}
    print("pipeline " + json.dumps(row), flush=True)
    rows.append(row)
  return rows


# ---------------------------------------------------------------------------------------------
# Components


def vjp_program(f):
  """jit of f's forward and backward: (diff, other, cotangent) -> gradient of diff, where f(diff,
  other) -> output and cotangent has the output's shape."""
  return jax.jit(lambda diff, other, cotangent: jax.vjp(lambda d: f(d, other), diff)[1](cotangent))


def model_parts(setup, rng):
  """{name: (f, diff, other)}: each part of the model as f(diff, other) -> output, diff = (its
  params, random float inputs of the shapes and dtypes it gets in the forward pass), other = the
  batch's features, mask and targets and the dropout key."""
  config, model, params, batch = setup.config, setup.model, setup.state.params, setup.batch
  mc = config.model
  other = {"features": batch["features"], "mask": batch["mask"], "key": setup.key,
           "targets": {k: batch[k] for k in ("future_targets", "past_targets")}}
  b, t, d = setup.batch_size, window_frames(config), mc.d_model
  dtype = jnp.dtype(mc.dtype)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
  x, act = normal(b, t, d), normal(b, t, d)
  memory, future = normal(b, mc.memory_tokens, d), normal(b, mc.future_queries, d)
  select = lambda act, mask: model_lib.select_act_tokens(act, mask, mc.num_act_tokens,
                                                         mc.act_token_selection)
  parts = {  # name: (params prefix, inputs, method)
      "input projection": ("projections_", (), lambda m, o: m.project(o["features"], train=True)),
      "processor": ("processor", (x,), lambda m, o, x: m.processor(x, o["mask"], train=True)),
      "memory": ("memory", (x,), lambda m, o, x: m.memory(x, o["mask"], train=True)[0]),
      "predictor": ("predictor", (act, memory), lambda m, o, act, memory: m.predictor(
          *select(act, o["mask"]), memory, train=True)),
      "classifiers + loss": ("classifiers_", (act, future), lambda m, o, act, future:
                             train_lib.compute_loss({"future": m.classify(future),
                                                     "past": m.classify(act)},
                                                    o["targets"], config.loss)[0]),
  }
  programs = {}
  for name, (prefix, inputs, method) in parts.items():
    def f(diff, other, method=method):
      sub, inputs = diff
      return model.apply({"params": sub}, other, *inputs, method=method,
                         rngs={"dropout": other["key"]})
    sub = {key: p for key, p in params.items() if key.startswith(prefix)}
    programs[name] = (f, (sub, inputs), other)
  return programs


def scan_inputs(config, rng):
  """Random inputs of one processor layer's selective scan at config's shapes, as MambaBlock
  makes them (u, B, C, z in config.dtype; delta, A, D float32)."""
  mc = config.model
  d_inner, _ = ssm.mamba_dims(mc.d_model, mc.ssm.expand)
  b, t, n = config.data.batch_size, window_frames(config), mc.ssm.d_state
  dtype = jnp.dtype(mc.dtype)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return (normal(b, t, d_inner).astype(dtype), jax.nn.softplus(normal(b, t, d_inner) - 4.0),
          -jnp.broadcast_to(jnp.arange(1.0, n + 1), (d_inner, n)),
          normal(b, t, n).astype(dtype), normal(b, t, n).astype(dtype), normal(d_inner),
          normal(b, t, d_inner).astype(dtype))


def time_program(name, program, args, reps, peak, bandwidth, step_ms):
  """Compiles and times a jitted program; one row of the components table."""
  start = time.perf_counter()
  compiled = program.lower(*args).compile()
  compile_s = time.perf_counter() - start
  seconds = bench(compiled, *args, reps=reps)
  row = {"component": name, "ms": 1e3 * seconds,
         "share_of_step": None if step_ms is None else 1e3 * seconds / step_ms,
         "compile_s": compile_s, **cost(compiled)}
  row.update(floors(row, peak, bandwidth))
  print("component " + json.dumps(row), flush=True)
  return row


def part_components(args, setup, step_ms, bandwidth):
  peak, _ = peak_flops(setup.config.model.dtype)
  rng = np.random.default_rng(1)
  timed = lambda name, program, *inputs: {"component": name, **guarded(
      name, time_program, name, program, inputs, args.repeats, peak, bandwidth, step_ms)}
  random_like = lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)).astype(x.dtype)
  rows = []
  for name, (f, diff, other) in model_parts(setup, rng).items():
    cotangent = random_like(jax.eval_shape(f, diff, other))
    rows.append(timed(name, vjp_program(f), diff, other, cotangent))
  # As train_step: the update and the gradient norm it logs (no donation: timed repeatedly).
  grads = jax.tree.map(lambda p: 1e-3 * p, setup.state.params)
  rows.append(timed("optimizer update", jax.jit(lambda state, grads: (
      state.apply_gradients(grads=grads), optax.global_norm(grads))), setup.state, grads))

  scan_args = scan_inputs(setup.config, rng)
  for impl in ("reference", "auto"):
    scan = functools.partial(ssm.selective_scan, implementation=impl)
    program = vjp_program(lambda diff, other, scan=scan: scan(*diff))
    name = f"selective scan, 1 layer ({'associative' if impl == 'reference' else 'model: auto'})"
    rows.append({**timed(name, program, scan_args, None, random_like(scan_args[0])),
                 "within": "processor"})
  return rows


# ---------------------------------------------------------------------------------------------
# Scaling


def part_scaling(args, bandwidth, bf16):
  """bf16: the 1-device bfloat16 Setup if the run has one (its step is the baseline)."""
  devices = args.devices
  if len(devices) < 2:
    print(f"scaling: {len(devices)} device, skipped")
    return []
  config = get_config(args, "bfloat16")
  base, n = config.data.batch_size, len(devices)
  rows = []
  for mode, count, batch in (("1 device", 1, base), ("strong", n, base), ("weak", n, base * n)):
    setup = bf16 if count == 1 and bf16 else Setup(config, train_lib.Parallel(devices[:count]),
                                                   batch)
    rows.append({"mode": mode, **measure_step(setup, args, bandwidth, with_costs=False)})
    del setup
  for row in rows[1:]:
    row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
  return rows


# ---------------------------------------------------------------------------------------------
# Summary and command line


def fmt(x, scale=1.0, digits=1):
  return "-" if x is None else f"{x * scale:.{digits}f}"


def print_summary(results):
  print(f"\n== {results['device']} x{results['device_count']}, jax {results['jax']}, "
        f"copy bandwidth {results['copy_bandwidth'] / 1e9:.0f} GB/s (read + write)")
  steps = results.get("step", [])
  if steps:
    print("\n| dtype | processor scan | ms/step | samples/s | EK100 epoch s | TFLOP/step | "
          "model TFLOP | MFU % | MFU model % | GB accessed | temp GB | "
          "floor ms: flops / bytes / io |")
    print("|---" * 12 + "|")
    for row in steps:
      scan = {"auto": "Pallas kernels (auto)", "reference": "associative"}[row["scan"]]
      if "error" in row:
        print(f"| {row['dtype']} | {scan} | {row['error']} |")
        continue
      print(f"| {row['dtype']} | {scan} | {row['step_ms']:.1f} | {row['samples_per_s']:.0f} | "
            f"{row['epoch_s']:.1f} | {fmt(row.get('flops'), 1e-12, 2)} | "
            f"{fmt(row.get('model_flops'), 1e-12, 2)} | {fmt(row.get('mfu'), 100)} | "
            f"{fmt(row.get('mfu_model'), 100)} | {fmt(row.get('bytes'), 1e-9)} | "
            f"{fmt(row.get('temp_bytes'), 1e-9)} | {fmt(row.get('floor_flops_ms'))} / "
            f"{fmt(row.get('floor_bytes_ms'))} / {fmt(row.get('floor_io_ms'), digits=2)} |")
    for row in steps:
      if "peak_name" in row and row["scan"] == "auto":
        print(f"peak for {row['dtype']}: {row['peak_name']}")
    ms = {(row["dtype"], row["scan"]): row["step_ms"] for row in steps if "step_ms" in row}
    base = ms.get(("float32", "auto"))
    for (dtype, scan), value in ms.items():
      if base and (dtype, scan) != ("float32", "auto"):
        print(f"speed-up of {dtype}, processor scan {scan}, over float32: "
              f"{base / value:.2f}x")
  components = results.get("components", [])
  if components:
    print("\n| component, bf16 fwd+bwd | ms | % of step | GFLOP | GB accessed | "
          "floor ms: flops / bytes |")
    print("|---" * 6 + "|")
    for row in components:
      if "error" in row:
        print(f"| {row['component']} | {row['error']} |")
        continue
      print(f"| {row['component']} | {row['ms']:.2f} | {fmt(row['share_of_step'], 100, 0)} | "
            f"{fmt(row['flops'], 1e-9)} | {fmt(row['bytes'], 1e-9, 2)} | "
            f"{fmt(row['floor_flops_ms'], digits=2)} / {fmt(row['floor_bytes_ms'], digits=2)} |")
    parts = [row["ms"] for row in components if "ms" in row and "within" not in row]
    print(f"model parts + update: {sum(parts):.1f} ms; the whole bf16 step: "
          f"{fmt(results['step_bf16_ms'])} ms")
  loader = results.get("loader", {})
  if loader:
    print("\n| loader workers | samples/s | EK100 epoch s | first batch s |")
    print("|---|---|---|---|")
    for row in loader.get("rows", []):
      print(f"| {row['workers']} | {row['samples_per_s']:.0f} | {row['epoch_s']:.1f} | "
            f"{row['first_batch_s']:.1f} |")
    for key in ("error", "dataset", "host_to_device"):
      if key in loader:
        print(f"{key}: {json.dumps(loader[key])}")
  pipe = results.get("pipeline", [])
  if isinstance(pipe, dict):
    print(f"\npipeline: {pipe['error']}")
  for row in pipe:
    print(f"\npipeline included, {row['feed']} ({row['workers']} workers, {row['dtype']}): "
          f"{row['samples_per_s']:.0f} samples/s, {row['step_ms']:.1f} ms/step, "
          f"EK100 epoch {row['epoch_s']:.1f} s")
  scaling = results.get("scaling", [])
  if scaling:
    print("\n| devices | mode | global batch | ms/step | samples/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in scaling:
      if "error" in row:
        print(f"| {row['mode']} | {row['error']} |")
        continue
      print(f"| {row['devices']} | {row['mode']} | {row['global_batch']} | {row['step_ms']:.1f} | "
            f"{row['samples_per_s']:.0f} | {fmt(row.get('speedup'), digits=2)} |")


def guarded(name, fn, *args):
  """fn(*args), or {"error": ...} printed and returned if it raises (the run goes on)."""
  try:
    return fn(*args)
  except Exception as e:  # e.g. out of device memory: reported, the other parts still run
    message = f"{type(e).__name__}: {e}"[:500]
    print(f"{name}: ERROR {message}", flush=True)
    return {"error": message}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny shapes for a CPU")
  parser.add_argument("--parts", default=",".join(PARTS),
                      help=f"comma-separated subset of {','.join(PARTS)} (default: all)")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="global batch of the step (default: the config's, 256; --quick 8)")
  parser.add_argument("--devices", type=int, default=None,
                      help="devices for the scaling part (default: all local devices)")
  parser.add_argument("--workers", default=None,
                      help="loader worker counts, comma-separated (default 0,8,16; --quick 0,2); "
                           "the pipeline part uses the fastest of them")
  parser.add_argument("--data-dir", default=None,
                      help="folder for the temporary dataset (default: the system temp dir)")
  parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  if parts - set(PARTS):
    parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {PARTS}")
  if args.quick:
    # The quick run checks the script, not speed: XLA's CPU backend compiles ~2x faster so.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_"
                               "level=0 --xla_llvm_disable_expensive_passes=true")
  local = jax.local_devices()  # the backend starts here, after XLA_FLAGS is final
  args.devices = local[:args.devices] if args.devices else local
  args.workers = [int(w) for w in (args.workers or ("0,2" if args.quick else "0,8,16")).split(",")]
  args.steps, args.repeats = (2, 2) if args.quick else (5, 3)
  args.loader_batches = 3 if args.quick else 12

  bandwidth = copy_bandwidth(args.quick)
  results = {"device": local[0].device_kind, "device_count": len(local), "jax": jax.__version__,
             "quick": args.quick, "copy_bandwidth": bandwidth, "epoch_samples": EPOCH_SAMPLES}
  one = train_lib.Parallel(args.devices[:1])
  bf16, step_ms = None, None
  if parts & {"step", "components", "pipeline"}:
    # The step part: float32, bfloat16, and bfloat16 with the associative scan in the processor;
    # the others need only the bfloat16 Setup.
    variants = ((("float32", None), ("bfloat16", None), ("bfloat16", "reference"))
                if "step" in parts else (("bfloat16", None),))
    results["step"] = []
    for dtype, scan in variants:
      config = get_config(args, dtype)
      setup = Setup(config, one, config.data.batch_size, scan=scan)
      row = guarded(f"step {dtype}", measure_step, setup, args, bandwidth, "step" in parts)
      results["step"].append({"dtype": dtype, "scan": scan or "auto", **row})
      if dtype == "bfloat16" and scan is None:
        bf16, step_ms = setup, row.get("step_ms")
      del setup
    results["step_bf16_ms"] = step_ms
  if "components" in parts:
    components = guarded("components", part_components, args, bf16, step_ms, bandwidth)
    results["components"] = ([{"component": "all", **components}]
                             if isinstance(components, dict) else components)
  if parts & {"loader", "pipeline"}:
    root = tempfile.mkdtemp(prefix="clam_loader_", dir=args.data_dir)
    try:
      # Smaller than the batches read: the loader repeats it (and the page cache holds it).
      data = dataset_config(get_config(args, "bfloat16"), os.path.join(root, "ek100"),
                            batches=6)
      start = time.perf_counter()
      info = synthetic.write_synthetic_ek100(data.root, **dict(data.synthetic))
      dataset = {"write_s": time.perf_counter() - start, "segments": info["num_segments"],
                 "train_windows": len(pipeline.make_source(data, "train"))}
      print("dataset " + json.dumps(dataset), flush=True)
      if "loader" in parts:
        results["loader"] = {"dataset": dataset, **guarded("loader", part_loader, args, data, one)}
      if "pipeline" in parts:
        # The loader part's fastest worker count (on an H200, 8 beat 16), else the largest.
        rates = {row["workers"]: row["samples_per_s"]
                 for row in results.get("loader", {}).get("rows", [])}
        workers = max(rates, key=rates.get) if rates else max(args.workers)
        results["pipeline"] = (guarded("pipeline", part_pipeline, args, data, bf16, workers)
                               if step_ms else {"error": "skipped: the bfloat16 step failed"})
    finally:
      shutil.rmtree(root, ignore_errors=True)
  if "scaling" in parts:
    scaling = guarded("scaling", part_scaling, args, bandwidth, bf16 if step_ms else None)
    results["scaling"] = [{"mode": "all", **scaling}] if isinstance(scaling, dict) else scaling
  stats = local[0].memory_stats()
  results["peak_device_bytes"] = stats and stats.get("peak_bytes_in_use")

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(results, indent=1))
  print_summary(results)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
