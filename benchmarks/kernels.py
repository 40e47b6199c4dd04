"""Speed of the gated linear-attention scan: every implementation on the same shapes, in one run.

Usage (GPU):  python benchmarks/kernels.py --json kernels.json [--quick]

First checks each Pallas kernel against the lax.scan reference on the GPU (outputs and gradients,
fresh random inputs), then times forward and forward+backward for
  seed        the paper's Algorithm 1/2: all states materialised by `state_update`, then read out
  scan        pallas.reference.gla_reference (lax.scan)
  assoc       pallas.reference.gla_associative (associative scan over materialised states)
  recurrent   pallas.gla_recurrent.gla_recurrent (Pallas kernel)
  chunked     pallas.gla_chunked.gla_chunked (Pallas kernel)
  fla-*       flash-linear-attention's Triton GLA kernels (torch), where importable, M = 1 only
and prints, per row, the median time, the ratio to the seed, and the fraction of the HBM roofline
(the fewest bytes the op must move over the copy bandwidth measured in the same run).
Variants whose materialised states would not fit in device memory are reported as skipped.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pallas import reference  # noqa: E402
from pallas.gla_chunked import gla_chunked  # noqa: E402
from pallas.gla_recurrent import gla_recurrent  # noqa: E402
from pallas.state_update import state_update  # noqa: E402

H, DK, DV = 8, 128, 128
STATE_BYTES_LIMIT = 24e9  # materialised-state variants above this are skipped (H100: 80 GB)


def seed_gla(q, k, v, g):
  """The paper's algorithm: gates and k^T v materialised, all states written, then read out."""
  gate = jnp.broadcast_to(jnp.exp(g.astype(jnp.float32))[..., None], k.shape + (v.shape[-1],))
  kv = k.astype(jnp.float32)[..., :, None] * v.astype(jnp.float32)[..., None, :]
  s = state_update(gate, kv)
  o = jnp.einsum("btmhk,bthkv->btmhv", q.astype(jnp.float32), s) * (k.shape[-1] ** -0.5)
  return o.astype(v.dtype)


IMPLEMENTATIONS = {
    "seed": seed_gla,
    "scan": reference.gla_reference,
    "assoc": reference.gla_associative,
    "recurrent": gla_recurrent,
    "chunked": gla_chunked,
}


def make_inputs(key, b, t, m, dtype):
  kq, kk, kv, kg = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, m, H, DK), dtype)
  k = jax.random.normal(kk, (b, t, H, DK), dtype)
  v = jax.random.normal(kv, (b, t, H, DV), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(kg, (b, t, H, DK), jnp.float32) + 3.0) / 4.0
  return q, k, v, g.astype(dtype)


def bench(fn, args, reps=20, budget_s=1.5):
  """Median wall time (ms) of a jitted fn after warm-up; stops early after budget_s."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  start = time.perf_counter()
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
    if time.perf_counter() - start > budget_s and len(times) >= 3:
      break
  return statistics.median(times)


def copy_bandwidth():
  """Device-to-device bandwidth (bytes read + written per second) of a 2 GiB elementwise pass."""
  x = jnp.ones((512 * 1024 * 1024,), jnp.float32)
  f = jax.jit(lambda x: x * 1.0001)
  ms = bench(f, (x,), reps=20)
  return 2 * x.nbytes / (ms * 1e-3)


def min_bytes(b, t, m, dtype, backward):
  """Fewest bytes: read q, k, v, g and write o; backward adds reading them and do, writing grads."""
  item = jnp.dtype(dtype).itemsize
  q, kk, v, g, o = b * t * m * H * DK, b * t * H * DK, b * t * H * DV, b * t * H * DK, b * t * m * H * DV
  fwd = (q + kk + v + g + o) * item
  return fwd + ((q + kk + v + g + o) + (q + kk + v + g)) * item if backward else fwd


def loss_fn(impl):
  def loss(q, k, v, g, w):
    return jnp.sum(impl(q, k, v, g).astype(jnp.float32) * w)
  return loss


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check_correctness(rows):
  """Kernels vs the lax.scan reference on the GPU: outputs and gradients of q, k, v, g."""
  print("== correctness on", jax.devices()[0].device_kind)
  for dtype, tol in ((jnp.float32, 5e-3), (jnp.bfloat16, 3e-2)):
    for m in (1, 16):
      key = jax.random.PRNGKey(int(time.time()))
      q, k, v, g = make_inputs(key, 2, 300, m, dtype)
      w = jax.random.normal(jax.random.PRNGKey(1), (2, 300, m, H, DV), jnp.float32)
      grad = lambda impl: jax.jit(jax.value_and_grad(loss_fn(impl), argnums=(0, 1, 2, 3)))
      _, ref_grads = grad(reference.gla_reference)(q, k, v, g, w)
      ref_o = reference.gla_reference(q, k, v, g)
      for name in ("seed", "recurrent", "chunked"):
        impl = IMPLEMENTATIONS[name]
        try:
          o = jax.jit(impl)(q, k, v, g)
          _, grads = grad(impl)(q, k, v, g, w)
          errs = [rel_err(o, ref_o)] + [rel_err(a, r) for a, r in zip(grads, ref_grads)]
          ok = all(e < tol for e in errs) and all(np.isfinite(errs))
          print(f"{name:10s} {jnp.dtype(dtype).name:9s} M={m:2d} rel err o,dq,dk,dv,dg = "
                + ", ".join(f"{e:.1e}" for e in errs) + ("  OK" if ok else "  FAIL"))
          rows.append(dict(kind="check", impl=name, dtype=jnp.dtype(dtype).name, m=m, errors=errs,
                           ok=bool(ok)))
        except Exception as e:  # a broken kernel is reported, the run goes on
          print(f"{name:10s} {jnp.dtype(dtype).name} M={m}: ERROR {type(e).__name__}: {e}"[:400])
          rows.append(dict(kind="check", impl=name, m=m, error=str(e)[:400], ok=False))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--json", default="kernels.json", help="where to write all rows")
  parser.add_argument("--quick", action="store_true", help="B=8, T in {128, 512} only")
  parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64],
                      help="B values (default: 8 64; the full table in two calls: see RESULTS.md)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 4096],
                      help="T values (default: 128 512 4096)")
  parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS),
                      choices=list(IMPLEMENTATIONS), help="implementations timed (default: all)")
  parser.add_argument("--no-fla", action="store_true",
                      help="leave out flash-linear-attention (its forward+backward at B=8 T=512 "
                           "did not finish within 4 minutes on an H200 in session 9)")
  parser.add_argument("--no-check", action="store_true",
                      help="skip the correctness check on the GPU (a run that already passed it)")
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  rows = []
  if not args.no_check:
    check_correctness(rows)
  bw = copy_bandwidth()
  print(f"== copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
  rows.append(dict(kind="copy", bytes_per_s=bw))
  fla = (lambda *a: {}) if args.no_fla else fla_benchmarks()
  table = []
  for b in ((8,) if args.quick else args.batch_sizes):
    for t in ((128, 512) if args.quick else args.lengths):
      for m in (1, 16):
        q, k, v, g = make_inputs(jax.random.PRNGKey(b * t + m), b, t, m, dtype)
        w = jax.random.normal(jax.random.PRNGKey(0), (b, t, m, H, DV), jnp.float32)
        states = b * t * H * DK * DV * 4
        for backward in (False, True):
          floor_ms = min_bytes(b, t, m, dtype, backward) / bw * 1e3
          results = {}
          for name in args.impls:
            impl = IMPLEMENTATIONS[name]
            if name in ("seed", "assoc") and states * (4 if backward else 3) > STATE_BYTES_LIMIT:
              results[name] = None
              continue
            if name == "scan" and backward and states > STATE_BYTES_LIMIT:
              results[name] = None
              continue
            try:
              if backward:
                fn = jax.jit(jax.grad(loss_fn(impl), argnums=(0, 1, 2, 3)))
                ms = bench(fn, (q, k, v, g, w))
              else:
                ms = bench(jax.jit(impl), (q, k, v, g))
            except Exception as e:  # reported in the table, the run goes on
              print(f"{name} B={b} T={t} M={m} bwd={backward}: {type(e).__name__}: {e}"[:300])
              ms = float("nan")
            results[name] = ms
            print(f"  {name} B={b} T={t} M={m} {'fwd+bwd' if backward else 'fwd'}: {ms:.3f} ms",
                  flush=True)  # progress: compiles can take minutes
          if m == 1:
            results.update(fla(b, t, dtype, backward))
          for name, ms in results.items():
            row = dict(kind="time", impl=name, b=b, t=t, m=m, backward=backward, ms=ms,
                       floor_ms=floor_ms, dtype=dtype.name)
            rows.append(row)
          table.append((b, t, m, backward, floor_ms, results))
          print(f"B={b:3d} T={t:5d} M={m:2d} {'fwd+bwd' if backward else 'fwd    '} " + "  ".join(
              f"{n}={'skip' if r is None else f'{r:.3f}'}" for n, r in results.items()), flush=True)
          # Rewritten after every row: a run cut short keeps what it measured.
          Path(args.json).write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                                     jax=jax.__version__, rows=rows), indent=1))
  print_table(table)


def fla_benchmarks():
  """flash-linear-attention's chunk and fused-recurrent GLA (torch + Triton) on the same shapes."""
  try:
    import torch
    from fla.ops.gla import chunk_gla, fused_recurrent_gla
    from triton.testing import do_bench
  except Exception as e:  # not installed on this machine: the table says so
    print(f"flash-linear-attention not available: {type(e).__name__}: {e}")
    return lambda *a: {}

  def run(b, t, dtype, backward):
    tdtype = torch.bfloat16 if dtype == jnp.bfloat16 else torch.float32
    mk = lambda d: torch.randn(b, t, H, d, device="cuda", dtype=tdtype, requires_grad=backward)
    q, k, v = mk(DK), mk(DK), mk(DV)
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, H, DK, device="cuda") + 3.0) / 4.0
    g = g.to(tdtype).requires_grad_(backward)
    out = {}
    for name, op in (("fla-chunk", chunk_gla), ("fla-recurrent", fused_recurrent_gla)):
      def fn():
        o, _ = op(q, k, v, g)
        if backward:
          o.backward(torch.ones_like(o))
      try:
        out[name] = do_bench(fn, warmup=25, rep=200, return_mode="median")
      except Exception as e:  # reported, the run goes on
        print(f"{name}: {type(e).__name__}: {e}"[:300])
        out[name] = float("nan")
    return out

  return run


def print_table(table):
  print("\n== median ms (x = speed-up over seed; % = HBM roofline fraction)")
  for b, t, m, backward, floor_ms, results in table:
    seed = results.get("seed")
    cells = []
    for name, ms in results.items():
      if ms is None:
        cells.append(f"{name}: skip")
        continue
      ratio = f" x{seed / ms:.1f}" if seed and ms == ms else ""
      cells.append(f"{name}: {ms:.3f}{ratio} {100 * floor_ms / ms:.0f}%")
    print(f"B={b} T={t} M={m} {'fwd+bwd' if backward else 'fwd'} floor={floor_ms:.3f}ms | "
          + " | ".join(cells))


if __name__ == "__main__":
  main()
