"""Block sizes of the batch-1 streaming step's kernels, per shape, against XLA, from GPU traces.

Usage (GPU):  python benchmarks/stream_kernel_sweep.py [--shapes 1x4096x1024,...] [--out FILE]
              JAX_PLATFORMS=cpu python benchmarks/stream_kernel_sweep.py --quick   (checks the
              script: no kernels in a CPU trace, so it reports that and exits 1)

For every product shape (rows R, K, N) of the EK100 fused step (clam_jax.fused_streaming) each
fused_dense candidate (block_n, block_k, num_warps, num_stages, split_k) is one jitted product,
called on each of `copies` distinct bf16 weights (>= 128 MB in all: well beyond the 50 MB L2, as
in the step, whose 168 MB of weights stream from HBM every frame), twice over, each call blocked
on, under jax.profiler.trace. Calls are blocked on one by one because independent products in one
jit run concurrently on the GPU, which inflates each kernel's duration. Reported per product: the
summed time of its kernels (with K split, XLA's sum of the partials and the bias included), in us
and in weight bandwidth (GB/s), and the median duration of the Pallas kernel itself. XLA: the
same product in jnp (bf16 inputs, float32 accumulation, bias). Inputs of K >= 2048 are bf16 (FFN
hidden units, Mamba's y), the others float32 (the residual stream). The Mamba kernels
(mamba_in_conv, mamba_scan_gate) are swept over block_c and num_warps the same way. Prints a
table per shape (best first) and writes every row to --out (JSON).
"""

import argparse
import collections
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.stream_kernels import trace_events  # noqa: E402
from pallas.fused_dense import Blocks, fused_dense  # noqa: E402
from pallas.mamba_step import mamba_in_conv, mamba_scan_gate, pack_x_proj  # noqa: E402

# (R, K, N) of the EK100 fused step's products (stream_kernels.py's profile of it).
SHAPES = ((1, 4096, 1024), (16, 4096, 1024), (1, 2048, 1024), (16, 1024, 4096), (32, 1024, 4096),
          (1, 1024, 4096), (2, 1024, 4224), (16, 1024, 1024), (16, 1024, 3072),
          (1, 1024, 6144), (1, 1024, 1024))
# (block_n, block_k, num_warps, num_stages, split_k): None stages = the K loop unrolled.
FEW_ROWS = ((16, 512, 4, None, 1), (2, 2048, 4, None, 1), (4, 2048, 8, None, 1),
            (4, 1024, 4, None, 1), (8, 1024, 8, None, 1), (1, 4096, 4, None, 1),
            (2, 1024, 4, None, 2), (8, 512, 4, None, 2), (8, 512, 4, None, 4),
            (16, 256, 4, None, 4), (32, 256, 8, None, 8), (16, 512, 4, 3, 1), (4, 512, 4, 4, 1))
MANY_ROWS = ((16, 512, 4, None, 1), (16, 256, 4, 3, 1), (32, 128, 4, 3, 1), (16, 256, 4, 3, 4),
             (16, 128, 4, 3, 4), (32, 128, 4, 3, 4), (16, 256, 4, None, 4),
             (16, 128, 4, None, 8), (32, 128, 4, 3, 2), (64, 64, 4, 3, 4), (16, 64, 4, None, 8),
             (32, 256, 8, 3, 4))
IN_CONV = ((16, 4), (16, 8), (8, 4), (8, 8), (32, 8), (32, 16))
SCAN_GATE = ((16, 4), (32, 2), (32, 4), (64, 4), (128, 4))
MIN_BYTES, REPEATS = 128 << 20, 2


def kernel_times(fn, weights):
  """{kernel name: [durations us]} of fn(w) for each w in weights, REPEATS times, each call
  blocked on, traced after a warm-up call."""
  jax.block_until_ready(fn(weights[0]))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for w in weights * REPEATS:
        jax.block_until_ready(fn(w))
    events = trace_events(log_dir)
  times = collections.defaultdict(list)
  for e in events:
    times[e["name"]].append(float(e.get("dur", 0.0)))
  return times


def measure(fn, weights, prefix, label, shape, gigabytes):
  """Row {kernel, shape, us, gb_s, kernel_us}: us = every kernel's time per call of the jitted
  fn(weight) (with K split, XLA's sum of the partials and epilogue included), kernel_us = the
  median launch of the kernel named prefix...; or a row with the error of a candidate that fails
  to compile (the sweep goes on)."""
  calls = REPEATS * len(weights)
  try:
    times = kernel_times(fn, weights)
  except Exception as e:
    return dict(kernel=label, shape=shape, error=f"{type(e).__name__}: {e}"[:300])
  us = sum(sum(t) for t in times.values()) / calls
  names = [name for name in times if name.startswith(prefix)]
  own = sum((times[name] for name in names), [])
  return dict(kernel=names[0] if len(names) == 1 else label, shape=shape, us=us,
              gb_s=gigabytes / us if gigabytes and us else None,
              kernel_us=statistics.median(own) if own else None,
              launches=sum(len(t) for t in times.values()) / calls)


def sweep_dense(r, k, n, key, quick):
  """Rows {kernel, shape, us, gb_s} for XLA and every fused_dense candidate at (r, k, n)."""
  copies = max(1, math.ceil(MIN_BYTES / (2 * k * n))) if not quick else 1
  keys = jax.random.split(key, copies + 1)
  weights = [(jax.random.normal(kk, (n, k)) / math.sqrt(k)).astype(jnp.bfloat16)
             for kk in keys[1:]]
  # As in the step: the long inputs (FFN hidden, Mamba y) in bf16, the residual stream float32.
  x = jax.random.normal(keys[0], (1, r, k), jnp.bfloat16 if k >= 2048 else jnp.float32)
  bias = jnp.zeros((n,), jnp.bfloat16)
  shape, gb = f"r{r}_k{k}_n{n}", 2 * k * n / 1e3
  xla = jax.jit(lambda w: jnp.einsum("brk,nk->brn", x.astype(jnp.bfloat16), w,
                                     preferred_element_type=jnp.float32) + bias)
  rows = [measure(xla, weights, "", "xla", shape, gb)]
  rows[0]["kernel"] = "xla"
  for block_n, block_k, num_warps, num_stages, split_k in (FEW_ROWS if r < 16 else MANY_ROWS):
    blocks = Blocks(block_n, block_k, num_warps, num_stages, split_k)
    fn = jax.jit(lambda w: fused_dense(x, w, bias, blocks=blocks))
    rows.append(measure(fn, weights, "fused_dense", f"bn{block_n} bk{block_k} w{num_warps} "
                        f"s{num_stages} split{split_k}", shape, gb))
  return rows


def sweep_mamba(key, quick):
  """Rows for mamba_in_conv and mamba_scan_gate at the EK100 layer (D 1024, Di 2048, N 16)."""
  d, di, n, dt_rank, d_conv = (1024, 2048, 16, 64, 4) if not quick else (64, 128, 4, 4, 4)
  copies = max(1, math.ceil(MIN_BYTES / (2 * 2 * di * d))) if not quick else 1
  keys = iter(jax.random.split(key, copies + 16))
  normal = lambda shape, scale=1.0: scale * jax.random.normal(next(keys), shape)
  in_weights = [normal((2 * di, d), d ** -0.5).astype(jnp.bfloat16) for _ in range(copies)]
  x_packed, dt_packed = pack_x_proj(normal((di, dt_rank + 2 * n), di ** -0.5),
                                    normal((dt_rank, di), dt_rank ** -0.5), dt_rank=dt_rank,
                                    d_state=n)
  x_packed, dt_packed = x_packed.astype(jnp.bfloat16), dt_packed.astype(jnp.bfloat16)
  h, scale = normal((1, d)), 1.0 + 0.1 * normal((d,))
  conv, conv_kernel, conv_bias = normal((1, d_conv - 1, di)), normal((d_conv, di)), normal((di,))
  ssm, a = normal((1, di, n)), -jnp.exp(normal((di, n), 0.5))
  u, z = normal((1, di)).astype(jnp.bfloat16), normal((1, di)).astype(jnp.bfloat16)
  dt_bias, skip = normal((di,), 0.1), normal((di,))
  rows = []
  for block_c, num_warps in IN_CONV:
    fn = jax.jit(lambda w: mamba_in_conv(h, scale, w, conv, conv_kernel, conv_bias, x_packed,
                                         eps=1e-5, block_c=block_c, num_warps=num_warps))
    rows.append(measure(fn, in_weights, "mamba_in_conv", f"c{block_c} w{num_warps}", "in_conv",
                        4 * di * d / 1e3))
  x_proj = normal((1, x_packed.shape[1]))
  for block_c, num_warps in SCAN_GATE:
    fn = jax.jit(lambda _: mamba_scan_gate(x_proj, dt_packed, dt_bias, a, skip, ssm, u, z,
                                           d_state=n, block_c=block_c, num_warps=num_warps))
    rows.append(measure(fn, in_weights, "mamba_scan_gate", f"c{block_c} w{num_warps}",
                        "scan_gate", None))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="one small shape and one copy (checks the script; CPU: interpret mode)")
  parser.add_argument("--out",
                      help="JSON path (default benchmarks/results/stream_kernel_sweep.json)")
  parser.add_argument("--shapes", help="products to sweep as RxKxN,... (default: every product "
                      "shape of the EK100 fused step)")
  args = parser.parse_args()
  out_path = Path(args.out or Path(__file__).parent / "results" / "stream_kernel_sweep.json")
  key = jax.random.key(0)
  shapes = SHAPES
  if args.quick:
    shapes = ((1, 64, 32), (16, 64, 32))
  elif args.shapes:
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
  device = jax.devices()[0].device_kind
  out_path.parent.mkdir(parents=True, exist_ok=True)

  def save(rows):  # after every shape: a sweep cut short keeps what it measured
    out_path.write_text(json.dumps(dict(device=device, jax=jax.__version__, rows=rows), indent=1))

  rows = sweep_mamba(jax.random.fold_in(key, len(shapes)), args.quick)
  save(rows)
  for i, (r, k, n) in enumerate(shapes):
    rows += sweep_dense(r, k, n, jax.random.fold_in(key, i), args.quick)
    save(rows)
  print(f"{device}, jax {jax.__version__}: median kernel time per call (best first)")
  for shape in dict.fromkeys(row["shape"] for row in rows):
    group = [row for row in rows if row["shape"] == shape]
    print(f"\n== {shape}")
    for row in sorted(group, key=lambda row: row.get("us") or math.inf):
      if "error" in row:
        print(f"  failed: {row['kernel']}: {row['error'][:120]}")
      elif row["us"]:
        bandwidth = f"{row['gb_s']:7.0f} GB/s" if row["gb_s"] else ""
        own = f"(this one {row['kernel_us']:6.2f})" if row["kernel_us"] else ""
        print(f"  {row['us']:7.2f} us {bandwidth} {row['launches']:4.1f} kernels  {own}  "
              f"{row['kernel']}")
  if not any(row.get("us") for row in rows):
    print("no GPU kernel events in the traces (CPU backend, or the profiler found no CUPTI)")
    sys.exit(1)


if __name__ == "__main__":
  main()
