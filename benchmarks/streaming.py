"""Online latency and memory: CLAM's stream_step against a softmax-attention memory, versus t.

Usage (GPU):  python benchmarks/streaming.py [--out benchmarks/results/streaming.json]
              python benchmarks/streaming.py --latency-only     (the variants table only, ~2 min)
              JAX_PLATFORMS=cpu python benchmarks/streaming.py --quick     (CPU, tiny model, ~10 min)

Variants table (every run, batch 1 and, for bf16 and fused, the largest batch; from the state
after 10 frames): the step with the params
  raw       as the model holds them (stream_step(params, ...))
  f32       streaming.prepare_stream_params(params, config): params-only work done once, the
            projections that share an input merged into one product each
  bf16      the same with cast=True: Dense kernels and biases in the compute dtype, cast once
  fused     clam_jax.fused_streaming: the same step in fused Pallas kernels, the processor's and
            the memory's side by side in shared launches
  fused_serial  the same kernels each launched alone (side_by_side=False)
and for each: blocked (median ms of single calls, each blocked on), unblocked (mean ms per call of
a Python loop of calls blocked once at the end: dispatch overlaps the device), scan (ms per frame
of a lax.scan of 256 steps in one call) and kernels (`kernel_count` of the compiled step: the
launches of one call in XLA's optimized HLO, and how many of them read only params).

The EK100 model (configs/ek100.py: D = 1024, 4 Mamba layers, 2 memory layers of 16 tokens and 8
heads, bfloat16 compute, float32 params and state), random params and frames, at batch 1 and 64
and t = 10, 1,000 and 100,000 frames seen (--quick: D = 64, one layer in each stack, float32,
batch 1 and 8, t = 10 and 1,000, fewer calls). Rows:

  clam      the jit-compiled stream_step (streaming.make_stream_step), state donated:
              step        median ms of single dispatched calls, each blocked on (latency per frame)
              scan        median ms / 100 of calls that run 100 steps in one lax.scan (every step's
                          outputs kept): per-frame throughput without the ~10-50 us dispatch
              bf16 W      step with the Dense kernels cast to the compute dtype (bfloat16) once, up
                          front: Flax casts them on every call anyway, so the outputs are the same
                          (their largest difference is recorded); float32 kernels are read (and
                          converted) at every step, 0.4 GB for this model
              projection / processor / memory / predictor (+ classifiers): each part of the step
                          jitted alone (model.apply with a method, as streaming._step calls them),
                          on the state at t, like the seed's Table C.12
  softmax   the same stream_step with each memory layer's cross linear attention swapped for
            softmax attention of the 16 memory tokens over a KV cache of every frame seen (same
            width: 8 heads of D / 8, bfloat16 cache); step as above. Everything else in its step
            is CLAM's, so its step minus CLAM's is the difference of the two memories.
  fused     clam_jax.fused_streaming's step at batch 1 on the same state at t: step and scan as
            clam's (bfloat16 weights, Pallas kernels)

How t is reached. CLAM's state has a fixed size, but it is run for real: one batch-1 stream is
advanced frame by frame (lax.scan of 100 steps per call) to each t, and the batch-64 rows start from
64 copies of that state (64 streams that have each seen t frames; what they saw cannot change the
cost). Every row of a given t starts from the state after exactly t frames, and advances it by its
own calls. The softmax baseline's cost does grow with t, and running it to t = 100,000 would take
O(t^2): its cache instead gets t random keys and values per layer and its position is set to t
(the cost does not depend on the values). The cache is preallocated per (batch, t) with room for
the t frames plus the frames its timed calls add, and each step writes its frame in place
(dynamic_update_slice on the donated cache) and attends to positions <= its own, over the whole
preallocated length with a mask: one compile per (batch, t), and a step at t reads ~t keys, as a
growing cache would. A cache that cannot fit the device is recorded as "OOM" (predicted from
memory_stats' bytes_limit, or caught as RESOURCE_EXHAUSTED).

Memory per row: the stream state's bytes (for softmax: the cache as allocated) and the device's
bytes_in_use after the row (params, both models' inputs, the live states) and the process's
running peak_bytes_in_use (memory_stats(); None on CPU). The JAX pool is raised to 95 % of
the card (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set) so that OOM means the card's memory.

Writes every row to --out (JSON) and a plot of per-step latency and memory against t (log x) next
to it (.png), and prints a table last. The seed reports 1.16 ms per frame (556 ms for 480 frames:
processor 150.55 + memory 105.36 + predictor 300.19 ms); the target is <= 0.15 ms per frame at
batch 1 on an H100, flat in t.
"""

import argparse
import functools
import collections
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clam_jax import clam  # noqa: E402
from clam_jax import model as model_lib  # noqa: E402
from clam_jax import fused_streaming  # noqa: E402
from clam_jax import replay  # noqa: E402
from clam_jax import streaming  # noqa: E402
from configs import ek100  # noqa: E402

SEED_MS_PER_FRAME = 556 / 480
TARGET_MS_PER_FRAME = 0.15
SCAN_STEPS = 100
VARIANT_SCAN_STEPS = 256
VARIANTS = ("raw", "f32", "bf16", "fused_serial", "fused")
# HLO instructions that launch nothing: they name, pack or reinterpret buffers.
_NO_LAUNCH = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "partition-id", "replica-id"}


class SoftmaxCrossAttention(nn.Module):
  """Drop-in for clam.CrossLinearAttention in streaming: the tokens attend by softmax to the keys
  and values of every frame so far, kept in a preallocated cache (parameter names as CLAM's, less
  the gate)."""
  config: object

  @nn.compact
  def __call__(self, tokens, frames, mask, cache, projections=None):
    """tokens: (B, M, D); frames: (B, 1, D), one streaming step (mask: all True, unused);
    cache: {"keys", "values": (B, H, C, DK) in config.dtype, "position": () int32, the frames
    already in it}; projections: CrossLinearAttention's precomputed ones, which the baseline (run
    on raw params) never gets. Returns (read-out (B, M, D), the cache with this frame's key and
    value added).
    """
    if projections:
      raise ValueError(f"the softmax baseline computes its own projections, got {list(projections)}")
    config = self.config
    dtype = jnp.dtype(config.dtype)
    heads, dk = config.memory_heads, config.d_model // config.memory_heads
    project = lambda name: nn.DenseGeneral((heads, dk), dtype=dtype, name=name)
    q = project("query")(tokens)                                       # (B, M, H, DK)
    position = cache["position"]
    # Heads before time, so both products read the cache as batched matrices without a transpose.
    new = {name: jax.lax.dynamic_update_slice_in_dim(
        cache[name], jnp.swapaxes(project(name[:-1])(frames), 1, 2).astype(dtype), position, 2)
        for name in ("keys", "values")}
    logits = dk ** -0.5 * jnp.einsum("bmhk,bhck->bhmc", q, new["keys"],
                                     preferred_element_type=jnp.float32)
    logits = jnp.where(jnp.arange(logits.shape[-1]) <= position, logits, -jnp.inf)
    o = jnp.einsum("bhmc,bhck->bmhk", jax.nn.softmax(logits).astype(dtype), new["values"])
    out = nn.DenseGeneral(config.d_model, axis=(-2, -1), dtype=dtype, name="out")
    return out(o), {**new, "position": position + 1}


def model_config(quick):
  config = ek100.get_config().model
  if quick:  # compiles dominate a CPU run: fewer layers, and float32 (XLA:CPU is slow on bf16)
    config.update(d_model=64, processor_layers=1, memory_layers=1, predictor_layers=1,
                  dtype="float32")
  return config


def _project(module, features):
  return module.project(features, train=False)


def _process(module, carry, x):
  return module.processor.step(carry, x)


def _memorize(module, x, state):
  return module.memory(x[:, None], jnp.ones((x.shape[0], 1), bool), state, train=False)


def _predict(module, tokens, mask, memory_tokens):
  return module.classify(module.predictor(tokens, mask, memory_tokens, train=False))


def make_fused_functions(config, params):
  """(prepared weights, {step, scan}) of fused_streaming's step (replay.make_streamer's), as
  make_functions' (state donated)."""
  prepared, step = replay.make_streamer(config, params, "fused")
  scan = jax.jit(lambda prepared, state, frames: jax.lax.scan(
      lambda s, f: step(prepared, s, f), state, frames), donate_argnums=1)
  return prepared, dict(step=step, scan=scan)


def time_step_and_scan(fns, params, state_t, frame, frames, reps, row):
  """Fills row's step_ms (single calls, each blocked on), finite, scan_ms_per_frame and
  first_call_s; state_t is left as it was."""
  (_, out), row["step_ms"], row["first_call_s"]["step"] = timed(
      lambda c: fns["step"](params, c[0], frame), (copy(state_t), None), reps["calls"],
      reps["warmup"])
  row["finite"] = finite(out)
  _, scan_ms, row["first_call_s"]["scan"] = timed(
      lambda c: fns["scan"](params, c[0], frames), (copy(state_t), None), reps["scans"], 1)
  row["scan_ms_per_frame"] = scan_ms / SCAN_STEPS


def measure_fused(fns, prepared, state_t, t, frame, frames, reps):
  """The fused row at (B = 1, t): step and scan as measure_clam's; state_t is left as it was."""
  row = dict(model="fused", batch=1, t=t, state_bytes=nbytes(state_t), first_call_s={})
  time_step_and_scan(fns, prepared, state_t, frame, frames, reps, row)
  row.update(device_memory())
  return row


def make_functions(config):
  """The jitted functions timed, one set per model (CLAM's or, traced under the swap, softmax's):
  step(params, state, frame) and scan(params, state, frames {m: (SCAN_STEPS, B, F_m)}) with the
  state donated, and the parts of a step, each (params, *inputs) -> outputs."""
  module = model_lib.CLAM(config)
  step = streaming.make_stream_step(config)

  def scan(params, state, frames):
    return jax.lax.scan(lambda s, f: step(params, s, f), state, frames)

  part = lambda method: jax.jit(
      lambda params, *args: module.apply({"params": params}, *args, method=method))
  return dict(step=jax.jit(step, donate_argnums=1), scan=jax.jit(scan, donate_argnums=1),
              project=part(_project), process=part(_process), memorize=part(_memorize),
              predict=part(_predict))


def timed(fn, carry, calls, warmup):
  """carry = fn(carry), warmup + calls times, each call blocked on.

  Returns (carry, median ms of the timed calls, seconds of the first call: compile included).
  """
  times = []
  for i in range(warmup + calls):
    start = time.perf_counter()
    carry = jax.block_until_ready(fn(carry))
    times.append(time.perf_counter() - start)
  return carry, 1e3 * statistics.median(times[warmup:]), times[0]


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def nbytes(tree):
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def device_memory():
  stats = jax.devices()[0].memory_stats() or {}
  return {key: stats.get(key) for key in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")}


def finite(tree):
  return bool(all(jnp.isfinite(x).all() for x in jax.tree.leaves(tree)))


def random_frames(key, config, lead):
  """{modality: (*lead, F_m)} float32 standard normal frames."""
  keys = jax.random.split(key, len(config.modalities))
  return {name: jax.random.normal(k, lead + (dim,))
          for k, (name, dim) in zip(keys, sorted(config.modalities.items()))}


def advance(fns, params, state, steps, frame, frames):
  """state after `steps` more frames (scans of SCAN_STEPS, then single steps; outputs dropped)."""
  for _ in range(steps // SCAN_STEPS):
    state, _ = fns["scan"](params, state, frames)
  for _ in range(steps % SCAN_STEPS):
    state, _ = fns["step"](params, state, frame)
  return jax.block_until_ready(state)


def measure_clam(fns, params, params_bf16, state_t, b, t, frame, frames, reps):
  """The clam row at (b, t); state_t (the state after t frames) is left as it was."""
  row = dict(model="clam", batch=b, t=t, state_bytes=nbytes(state_t), first_call_s={})
  calls, warmup = reps["calls"], reps["warmup"]
  time_step_and_scan(fns, params, state_t, frame, frames, reps, row)
  _, row["step_bf16_kernels_ms"], row["first_call_s"]["step_bf16_kernels"] = timed(
      lambda c: fns["step"](params_bf16, c[0], frame), (copy(state_t), None), calls, warmup)
  ref = fns["step"](params, copy(state_t), frame)[1]
  out = fns["step"](params_bf16, copy(state_t), frame)[1]
  row["bf16_kernels_max_abs_diff"] = max(
      float(jnp.abs(x - r).max()) for x, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
  row["parts_ms"] = {}

  def part(name, call):
    out, row["parts_ms"][name], row["first_call_s"][name] = timed(lambda _: call(), None, calls,
                                                                   warmup)
    return out

  x = part("projection", lambda: fns["project"](params, frame))
  part("processor", lambda: fns["process"](params, state_t["processor"], x))
  memory_tokens, _ = part("memory", lambda: fns["memorize"](params, x, state_t["memory"]))
  part("predictor", lambda: fns["predict"](params, state_t["act_tokens"], state_t["act_mask"],
                                           memory_tokens))
  row.update(device_memory())
  return row


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_rows(key, shape, dtype):
  """A (B, H, C, DK) array of dtype whose rows (axis 2) repeat one random block of <= 1024 rows:
  written once, with no random bits or copy as large as the result."""
  block = jax.random.normal(key, shape[:2] + (min(shape[2], 1024), shape[3]), dtype)
  return jnp.take(block, jnp.arange(shape[2]) % block.shape[2], axis=2)


def softmax_state(config, b, t, capacity, key):
  """init_stream_state with each memory layer's state a cache of `capacity` frames whose first t
  hold random keys and values, at position t."""
  shape = (b, config.memory_heads, capacity, config.d_model // config.memory_heads)
  keys = iter(jax.random.split(key, 2 * config.memory_layers))
  memory = tuple({"keys": random_rows(next(keys), shape, jnp.dtype(config.dtype)),
                  "values": random_rows(next(keys), shape, jnp.dtype(config.dtype)),
                  "position": jnp.int32(t)} for _ in range(config.memory_layers))
  return {**streaming.init_stream_state(config, b), "memory": memory}


def measure_softmax(fns, params, config, b, t, frame, reps, key):
  """The softmax row at (b, t): the step's latency from position t."""
  calls, warmup = reps["calls"], reps["warmup"]
  capacity = t + calls + warmup
  dk = config.d_model // config.memory_heads
  cache_bytes = (2 * config.memory_layers * b * config.memory_heads * capacity * dk
                 * jnp.dtype(config.dtype).itemsize)
  row = dict(model="softmax", batch=b, t=t, capacity=capacity, first_call_s={})
  memory = device_memory()
  if memory["bytes_limit"] and cache_bytes > 0.95 * (memory["bytes_limit"]
                                                     - memory["bytes_in_use"]):
    return {**row, "status": "OOM", "error": f"predicted: a {cache_bytes / 2**30:.1f} GiB cache, "
            f"{(memory['bytes_limit'] - memory['bytes_in_use']) / 2**30:.1f} GiB free", **memory}
  try:
    state = softmax_state(config, b, t, capacity, key)
    row["state_bytes"] = nbytes(state)
    (state, out), row["step_ms"], row["first_call_s"]["step"] = timed(
        lambda c: fns["step"](params, c[0], frame), (state, None), calls, warmup)
    row["finite"] = finite(out)
    row.update(device_memory(), status="ok")
  except Exception as e:  # an OOM is a result; anything else is reported and the run goes on
    oom = "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()
    print(f"softmax B={b} t={t}: {type(e).__name__}: {e}"[:400], flush=True)
    row.update(status="OOM" if oom else "error", error=f"{type(e).__name__}: {e}"[:400])
  return row


def kernel_count(hlo_text):
  """Kernel launches of one call of a compiled function, from its optimized HLO
  (jax.jit(f).lower(...).compile().as_text()).

  Counts the instructions of the entry computation that run work (a fusion is one kernel; a
  custom-call is a library call or a Pallas kernel; a dot or copy left unfused is one more), and
  those of while bodies and conditional branches once each (one iteration). On CPU this is a proxy
  for the GPU's count: XLA:CPU fuses differently and upcasts bfloat16 products to float32.
  Returns {"total": n, "by_op": {opcode: n}, "params_only": the launches whose operands are all
  entry parameters (per-call work on params alone, e.g. dtype conversions of weights)}.
  """
  computations, name = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = "ENTRY" if header.group(1) else header.group(2)
      computations[name] = []
    elif name and " = " in line:
      computations[name].append(line)
  by_op, params_only = collections.Counter(), 0

  def visit(name):
    nonlocal params_only
    parameters = set()
    for line in computations[name]:
      result, rest = line.split(" = ", 1)
      opcode = re.search(r"(?:^|\s)([a-z][a-z\-]*)\(", rest).group(1)
      if opcode == "parameter":
        parameters.add(result.split()[-1])
      if opcode in _NO_LAUNCH:
        continue
      if opcode in ("while", "conditional"):
        for callee in re.findall(r"(?:body|branch_computations)=\{?%?([\w.\-]+(?:, %[\w.\-]+)*)",
                                 rest):
          for sub in callee.replace("%", "").split(", "):
            visit(sub)
        continue
      by_op[opcode] += 1
      operands = re.findall(r"%[\w.\-]+", rest.split("),", 1)[0])
      if name == "ENTRY" and operands and all(o in parameters for o in operands):
        params_only += 1

  visit("ENTRY")
  return {"total": sum(by_op.values()), "by_op": dict(by_op), "params_only": params_only}


def measure_variants(config, params, state, frame, reps, names=VARIANTS):
  """The variants table's rows (module doc) at the batch of state and frame, for `names`."""
  steps = {"stream": streaming.make_stream_step(config),
           "fused": fused_streaming.make_fused_stream_step(config),
           "fused_serial": fused_streaming.make_fused_stream_step(config, side_by_side=False)}
  frames = jax.tree.map(lambda x: jnp.broadcast_to(x, (VARIANT_SCAN_STEPS,) + x.shape), frame)
  prepare = {"raw": lambda: params, "f32": lambda: streaming.prepare_stream_params(params, config),
             "bf16": lambda: streaming.prepare_stream_params(params, config, cast=True),
             "fused": lambda: fused_streaming.prepare_fused_params(params, config)}
  prepare["fused_serial"] = prepare["fused"]
  rows, reference = [], None
  for name in names:
    step = steps.get(name, steps["stream"])
    jit_step = jax.jit(step, donate_argnums=1)
    jit_scan = jax.jit(lambda params, state, frames, step=step: jax.lax.scan(
        lambda s, f: step(params, s, f), state, frames), donate_argnums=1)
    batch = frame[next(iter(frame))].shape[0]
    start = time.perf_counter()
    try:
      prepared = jax.block_until_ready(prepare[name]())
      compiled = jit_step.lower(prepared, state, frame).compile()  # timed below: compiled once
    except Exception as e:  # e.g. a Pallas kernel Triton rejects on this GPU: a row, not a crash
      rows.append(dict(variant=name, batch=batch, error=f"{type(e).__name__}: {e}"[:500]))
      continue
    row = dict(variant=name, batch=batch, params_bytes=nbytes(prepared),
               compile_s=time.perf_counter() - start, kernels=kernel_count(compiled.as_text()))
    (_, out), row["blocked_ms"], _ = timed(
        lambda c: compiled(prepared, c[0], frame), (copy(state), None), reps["calls"],
        reps["warmup"])
    reference = out if reference is None else reference
    row["max_abs_diff_vs_raw"] = max(float(jnp.abs(x - r).max()) for x, r in
                                     zip(jax.tree.leaves(out), jax.tree.leaves(reference)))
    carry = copy(state)
    for _ in range(reps["warmup"]):
      carry, out = compiled(prepared, carry, frame)
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(reps["calls"]):
      carry, out = compiled(prepared, carry, frame)
    jax.block_until_ready((carry, out))
    row["unblocked_ms"] = 1e3 * (time.perf_counter() - start) / reps["calls"]
    _, scan_ms, _ = timed(lambda c: jit_scan(prepared, c[0], frames), (copy(state), None),
                          reps["scans"], 1)
    row["scan_ms_per_frame"] = scan_ms / VARIANT_SCAN_STEPS
    row["finite"] = finite(out)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="a tiny model, B in {1, 8}, t in {10, 1000}, fewer calls: a CPU "
                      "check (~10 min: the fused step runs in Pallas interpret mode)")
  parser.add_argument("--out", help="JSON path (default benchmarks/results/streaming[_quick].json);"
                      " the plot goes next to it (.png)")
  parser.add_argument("--latency-only", action="store_true",
                      help="only the variants table (batch 1): no t sweep, parts or softmax memory")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated variants of the table (default all: {VARIANTS}); "
                      "bf16 and fused also run at the largest batch")
  args = parser.parse_args()
  names = tuple(args.variants.split(","))
  if not set(names) <= set(VARIANTS):
    parser.error(f"--variants: expected names from {VARIANTS}, got {args.variants!r}")
  out_path = Path(args.out or Path(__file__).parent / "results" /
                  f"streaming{'_quick' if args.quick else ''}.json")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  ts = (10, 1000) if args.quick else (10, 1000, 100_000)
  batches = (1, 8) if args.quick else (1, 64)
  reps = (dict(calls=20, warmup=2, scans=3) if args.quick
          else dict(calls=200, warmup=5, scans=10))
  config = model_config(args.quick)
  start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)
  # XLA's own generator: the params' init compiles in half the time of threefry's.
  key = jax.random.key(time.time_ns() % 2**31, impl="rbg")
  init_key, frame_key, cache_key = jax.random.split(key, 3)
  params = jax.jit(lambda k: model_lib.CLAM(config).init(
      k, random_frames(k, config, (1, 2)), jnp.ones((1, 2), bool), train=False)["params"])(
      init_key)
  dtype = jnp.dtype(config.dtype)
  params_bf16 = jax.tree_util.tree_map_with_path(
      lambda path, p: p.astype(dtype) if path[-1].key == "kernel" else p, params)
  log(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
      f"{sum(p.size for p in jax.tree.leaves(params)) / 1e6:.1f} M params")
  clam_fns = make_functions(config)
  fused_prepared, fused_fns = make_fused_functions(config, params)
  softmax_fns = make_functions(config)  # traced (at first call) under the swap below
  swap = mock.patch.object(clam, "CrossLinearAttention", SoftmaxCrossAttention)
  inputs = {b: (random_frames(frame_key, config, (b,)),
                random_frames(frame_key, config, (SCAN_STEPS, b))) for b in batches}
  state = advance(clam_fns, params, streaming.init_stream_state(config, 1), 10, *inputs[1])
  variants = measure_variants(config, params, state, inputs[1][0], reps, names)
  big = max(batches)
  variants += measure_variants(config, params, jax.tree.map(lambda x: jnp.repeat(x, big, axis=0),
                                                            state),
                               inputs[big][0], reps, [n for n in names if n in ("bf16", "fused")])
  log("variants: " + ", ".join(f"{r['variant']} " + (f"{r['blocked_ms']:.3f} ms" if "error" not in r
                                                    else "failed") for r in variants))
  state, seen, rows = streaming.init_stream_state(config, 1), 0, []
  for t in ts if not args.latency_only else ():
    state = advance(clam_fns, params, state, t - seen, *inputs[1])
    seen = t
    log(f"batch-1 stream at t={t}")
    for b in batches:
      state_b = jax.tree.map(lambda x: jnp.repeat(x, b, axis=0), state)
      rows.append(measure_clam(clam_fns, params, params_bf16, state_b, b, t, *inputs[b], reps))
      del state_b
      log(f"clam B={b} t={t}: step {rows[-1]['step_ms']:.3f} ms")
      if b == 1:
        rows.append(measure_fused(fused_fns, fused_prepared, state, t, *inputs[1], reps))
        log(f"fused B=1 t={t}: step {rows[-1]['step_ms']:.3f} ms")
      with swap:
        rows.append(measure_softmax(softmax_fns, params, config, b, t, inputs[b][0], reps,
                                    jax.random.fold_in(cache_key, t)))
      log(f"softmax B={b} t={t}: " + (f"step {rows[-1]['step_ms']:.3f} ms"
                                      if "step_ms" in rows[-1] else rows[-1]["status"]))
  results = dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(),
                 jax=jax.__version__, quick=args.quick, config=config.to_dict(),
                 params_bytes=nbytes(params),
                 seed_ms_per_frame=SEED_MS_PER_FRAME, target_ms_per_frame=TARGET_MS_PER_FRAME,
                 calls=reps, elapsed_s=time.perf_counter() - start, variants=variants,
                 rows=rows)
  out_path.write_text(json.dumps(results, indent=1))
  if rows:
    plot(rows, out_path.with_suffix(".png"), results["device"])
    print_table(results, out_path)
  print_variants(results, out_path)


def plot(rows, path, device):
  """Per-step latency and memory against t (log-log), CLAM vs softmax, one line per batch."""
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.5))
  for model, marker in (("clam", "o"), ("fused", "^"), ("softmax", "s")):
    for b, color in zip(sorted({r["batch"] for r in rows}), ("C0", "C1")):
      ok = [r for r in rows if r["model"] == model and r["batch"] == b and "step_ms" in r]
      if not any(r["model"] == model and r["batch"] == b for r in rows):
        continue  # e.g. the fused step runs at batch 1 only
      t = [r["t"] for r in ok]
      style = dict(marker=marker, color=color, linestyle="-" if model == "clam" else "--")
      ax_time.plot(t, [r["step_ms"] for r in ok], label=f"{model} B={b} (step)", **style)
      if model != "softmax":
        ax_time.plot(t, [r["scan_ms_per_frame"] for r in ok], marker=marker, color=color,
                     linestyle=":", label=f"{model} B={b} (scan of {SCAN_STEPS}, per frame)")
      ax_memory.plot(t, [r["state_bytes"] / 2**20 for r in ok], label=f"{model} B={b} state",
                     **style)
      in_use = [(r["t"], r["bytes_in_use"] / 2**20) for r in ok if r.get("bytes_in_use")]
      if in_use:
        ax_memory.plot(*zip(*in_use), marker=marker, color=color, linestyle="-.", alpha=0.5,
                       label=f"{model} B={b} device in use")
      for r in rows:
        if r["model"] == model and r["batch"] == b and "step_ms" not in r:
          ax_time.annotate(f"{model} B={b}: {r['status']}", (r["t"], ax_time.get_ylim()[1]),
                           fontsize=7, color=color, ha="right", va="top")
  ax_time.axhline(SEED_MS_PER_FRAME, color="gray", linewidth=0.8)
  ax_time.axhline(TARGET_MS_PER_FRAME, color="green", linewidth=0.8)
  for ax, label in ((ax_time, "ms per step"), (ax_memory, "MiB")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t (frames seen)")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  ax_time.set_title(f"per-step latency (gray: seed, green: target), {device}", fontsize=9)
  ax_memory.set_title("stream state and device memory in use", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_table(results, out_path):
  ms = lambda x: "-" if x is None else f"{x:.3f}"
  mib = lambda x: "-" if x is None else f"{x / 2**20:.1f}"
  print(f"\n== streaming, {results['device']}, jax {results['jax']}, EK100 model"
        f"{' (quick: tiny)' if results['quick'] else ''}; median ms per frame; "
        f"seed {SEED_MS_PER_FRAME:.2f}, target <= {TARGET_MS_PER_FRAME} at B=1; "
        f"{out_path} (+ .png)")
  print(f"{'model':8s} {'B':>3s} {'t':>7s} {'step':>8s} {'scan':>8s} {'bf16 W':>8s} "
        f"{'proj':>7s} {'proc':>7s} {'memory':>7s} {'pred':>7s} {'state MiB':>10s} "
        f"{'in use MiB':>10s}")
  for r in results["rows"]:
    parts = r.get("parts_ms", {})
    cells = [ms(r.get("step_ms")), ms(r.get("scan_ms_per_frame")),
             ms(r.get("step_bf16_kernels_ms"))]
    if "step_ms" not in r:
      cells = [r["status"], "-", "-"]
    print(f"{r['model']:8s} {r['batch']:3d} {r['t']:7d} " + " ".join(f"{c:>8s}" for c in cells)
          + " " + " ".join(f"{ms(parts.get(p)):>7s}"
                           for p in ("projection", "processor", "memory", "predictor"))
          + f" {mib(r.get('state_bytes')):>10s} {mib(r.get('bytes_in_use')):>10s}")



def print_variants(results, out_path):
  print(f"\n== stream_step variants, {results['device']}, jax {results['jax']}, EK100 model"
        f"{' (quick: tiny)' if results['quick'] else ''}; ms; target <= "
        f"{TARGET_MS_PER_FRAME} per frame at B = 1; max |diff|: against the first row of the "
        f"same B; {out_path}")
  print(f"{'variant':8s} {'B':>3s} {'blocked':>8s} {'unblocked':>10s} {'scan/frame':>11s} "
        f"{'kernels':>8s} "
        f"{'params-only':>12s} {'params MiB':>11s} {'max |diff|':>11s}")
  for r in results["variants"]:
    if "error" in r:
      print(f"{r['variant']:8s} {r['batch']:3d} failed: {r['error'][:200]}")
      continue
    print(f"{r['variant']:8s} {r['batch']:3d} {r['blocked_ms']:8.3f} {r['unblocked_ms']:10.3f} "
          f"{r['scan_ms_per_frame']:11.4f} {r['kernels']['total']:8d} "
          f"{r['kernels']['params_only']:12d} {r['params_bytes'] / 2**20:11.1f} "
          f"{r['max_abs_diff_vs_raw']:11.2e}")


if __name__ == "__main__":
  main()
