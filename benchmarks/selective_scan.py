"""The processor's selective scan on the GPU: Pallas kernels vs the associative scan vs a lax.scan.

Usage:
  python3 benchmarks/selective_scan.py [--out selective_scan.json]
  JAX_PLATFORMS=cpu python3 benchmarks/selective_scan.py --quick      # CPU, tiny, interpret mode

1. Correctness on the device: pallas.selective_scan vs ssm.selective_scan's associative scan (float32,
   B=2 T=300 Di=256 N=16): y, h_T and the gradients of u, delta, A, B, C, h0 (relative errors).
2. With --sweep, a sweep of the kernels' launch parameters (chunk, block_d, num_warps) at one EK100
   processor layer (B=256, T=128, Di=2048, N=16; u, B, C bfloat16 as the bfloat16 model gives them,
   delta float32), forward + backward (each point compiles for ~25 s on an H200).
3. Table: forward and forward + backward of the associative scan ("assoc", what the model ran
   before), a lax.scan of ssm.selective_scan_step ("scan") and the kernels (their defaults, or the
   best sweep point),
   at that layer shape and at B=8 T=4096 and B=1 T=65536; median ms, the fewest bytes each pass must
   move (inputs read once, outputs written once) over the copy bandwidth measured in the same run,
   and the compiled program's temporary memory.
"""

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernels import bench, copy_bandwidth  # noqa: E402  (the same timing as kernels.py)
from clam_jax import ssm  # noqa: E402
from pallas.selective_scan import selective_scan_pallas  # noqa: E402


def make_inputs(key, b, t, di, n, dtype):
  """Scan inputs as a Mamba layer makes them: delta = softplus(...) float32, A = -(1..N)."""
  ku, kd, kb, kc, kh = jax.random.split(key, 5)
  u = jax.random.normal(ku, (b, t, di), dtype)
  delta = jax.nn.softplus(jax.random.normal(kd, (b, t, di)) - 4.0)
  a = -jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))
  bb = jax.random.normal(kb, (b, t, n), dtype)
  c = jax.random.normal(kc, (b, t, n), dtype)
  h0 = jax.random.normal(kh, (b, di, n))
  return u, delta, a, bb, c, h0


def associative(u, delta, a, b, c, h0):
  f32 = lambda x: x.astype(jnp.float32)
  return ssm.selective_scan(f32(u), delta, a, f32(b), f32(c), jnp.zeros(u.shape[-1]), None, h0,
                            return_final_state=True)


def sequential(u, delta, a, b, c, h0):
  """lax.scan over time of ssm.selective_scan_step (the streaming step)."""
  time_major = lambda x: jnp.moveaxis(x.astype(jnp.float32), 1, 0)

  def body(h, xs):
    return ssm.selective_scan_step(h, *xs[:2], a, *xs[2:], jnp.zeros(u.shape[-1]))

  h, y = jax.lax.scan(body, h0, tuple(map(time_major, (u, delta, b, c))))
  return jnp.moveaxis(y, 0, 1), h


def kernels(chunk, block_d, num_warps, interpret):
  return lambda *args: selective_scan_pallas(*args, chunk=chunk, block_d=block_d,
                                             num_warps=num_warps, interpret=interpret)


def forward_backward(fn, b, t, di, n):
  """jit(grad) of a loss weighting every output: gradients of all six inputs."""
  wy = jax.random.normal(jax.random.PRNGKey(1), (b, t, di))
  wh = jax.random.normal(jax.random.PRNGKey(2), (b, di, n))

  def loss(*args):
    y, h = fn(*args)
    return jnp.sum(y * wy) + jnp.sum(h * wh)

  return jax.jit(jax.grad(loss, argnums=tuple(range(6))))


def min_bytes(args, backward):
  """Inputs read and y, h_T written once; the backward also reads dy and writes every gradient."""
  size = lambda x: x.size * x.dtype.itemsize
  u, delta, _, b, c, h0 = args
  fwd = sum(map(size, args)) + u.size * 4 + h0.size * 4
  return fwd + sum(map(size, args)) + u.size * 4 if backward else fwd


def temp_bytes(fn, args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(interpret, shape):
  """Kernels vs the associative scan: y, h_T and six gradients. Returns {name: rel. error}."""
  args = make_inputs(jax.random.PRNGKey(0), *shape, jnp.float32)
  kernel = kernels(16, 32, 4, interpret)
  errors = dict(zip(("y", "h_T"), map(rel_err, jax.jit(kernel)(*args), jax.jit(associative)(*args))))
  grads = forward_backward(kernel, *shape)(*args)
  grads_ref = forward_backward(associative, *shape)(*args)
  errors.update({f"d{name}": rel_err(g, r) for name, g, r in
                 zip(("u", "delta", "A", "B", "C", "h0"), grads, grads_ref)})
  return errors


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--out", default="selective_scan.json", help="where to write every number")
  parser.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
  parser.add_argument("--sweep", action="store_true", help="sweep chunk, block_d, num_warps first")
  args = parser.parse_args()
  interpret = jax.default_backend() != "gpu"
  report = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, sweep=[], rows=[])
  save = lambda: Path(args.out).write_text(json.dumps(report, indent=1))

  report["check"] = check(interpret, (2, 40, 64, 16) if args.quick else (2, 300, 256, 16))
  print("correctness (rel. error vs associative scan):",
        " ".join(f"{k}={v:.1e}" for k, v in report["check"].items()), flush=True)
  bw = report["copy_bytes_per_s"] = copy_bandwidth()
  print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)

  layer = (8, 32, 128, 16) if args.quick else (256, 128, 2048, 16)
  inputs = make_inputs(jax.random.PRNGKey(3), *layer, jnp.bfloat16)
  grid = (itertools.product((8, 16), (32,), (4,)) if args.quick else
          itertools.product((8, 16, 32), (16, 32, 64), (1, 2, 4)) if args.sweep else
          [(8, 16, 1)])  # selective_scan_pallas's defaults
  best = None
  for chunk, block_d, num_warps in grid:
    try:
      ms = bench(forward_backward(kernels(chunk, block_d, num_warps, interpret), *layer), inputs,
                 budget_s=0.3)
    except Exception as e:  # a launch that does not fit (registers, shared memory): reported, skipped
      print(f"  chunk={chunk} block_d={block_d} warps={num_warps}: {type(e).__name__}"[:200])
      continue
    report["sweep"].append(dict(chunk=chunk, block_d=block_d, num_warps=num_warps, fwd_bwd_ms=ms))
    print(f"  chunk={chunk:2d} block_d={block_d:2d} warps={num_warps}: fwd+bwd {ms:.3f} ms", flush=True)
    if best is None or ms < best[0]:
      best = (ms, chunk, block_d, num_warps)
  save()
  report["best"] = dict(zip(("fwd_bwd_ms", "chunk", "block_d", "num_warps"), best))
  print("best:", report["best"], flush=True)

  impls = {"assoc": associative, "scan": sequential, "pallas": kernels(*best[1:], interpret)}
  shapes = [layer] if args.quick else [layer, (8, 4096, 2048, 16), (1, 65536, 2048, 16)]
  for shape in shapes:
    inputs = make_inputs(jax.random.PRNGKey(4), *shape, jnp.bfloat16)
    for backward in (False, True):
      floor_ms = min_bytes(inputs, backward) / bw * 1e3
      for name, impl in impls.items():
        fn = forward_backward(impl, *shape) if backward else jax.jit(impl)
        try:
          ms, temp = bench(fn, inputs), temp_bytes(fn, inputs)
        except Exception as e:  # e.g. out of memory: reported, the run goes on
          print(f"  {name} {shape} bwd={backward}: {type(e).__name__}: {e}"[:300], flush=True)
          ms, temp = float("nan"), None
        report["rows"].append(dict(impl=name, shape=shape, backward=backward, ms=ms,
                                   floor_ms=floor_ms, temp_bytes=temp))
        print(f"  {name:6s} B,T,Di,N={shape} {'fwd+bwd' if backward else 'fwd'}: {ms:.3f} ms "
              f"(floor {floor_ms:.3f}, temp {temp / 2**30 if temp else float('nan'):.2f} GiB)",
              flush=True)
      save()

  print(f"\n{'B,T,Di,N':>22} {'pass':8} {'floor':>8} " + " ".join(f"{n:>9}" for n in impls)
        + "  assoc/pallas")
  for shape in shapes:
    for backward in (False, True):
      rows = {r["impl"]: r for r in report["rows"] if r["shape"] == shape and r["backward"] == backward}
      print(f"{str(shape):>22} {'fwd+bwd' if backward else 'fwd':8} {rows['pallas']['floor_ms']:8.3f} "
            + " ".join(f"{rows[n]['ms']:9.3f}" for n in impls)
            + f"  {rows['assoc']['ms'] / rows['pallas']['ms']:.1f}x")


if __name__ == "__main__":
  main()
