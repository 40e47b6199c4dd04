"""fused_dense's block sizes at batch 1 against XLA: microseconds per product of an FFN chain.

Usage (GPU):  python benchmarks/fused_dense_sweep.py [--batch 1] [--out fused_dense_sweep.json]

The chain: 8 pre-norm FFN blocks of the EK100 width, x <- x + relu(LN(x) W1^T + b1) W2^T + b2
(W1: 4096 x 1024, W2: 1024 x 4096, bfloat16, x: (B, 1, 1024) float32), i.e. 16 products, once as
two fused_dense kernels per block for each (block_n, block_k, num_warps) and once in plain jnp
(XLA's kernels). Median over 5 repeats of 100 dispatched calls, divided by 16 products. Prints a
table (and the largest difference from the XLA chain, relative to its largest value) and writes
the rows to --out (JSON).
"""

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas.fused_dense import Norm, fused_dense  # noqa: E402

D, HIDDEN, BLOCKS = 1024, 4096, 8
CONFIGS = ((16, 512, 4), (8, 1024, 4), (32, 256, 4), (16, 512, 8), (4, 1024, 2))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                           "fused_dense_sweep.json"))
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  w1 = (jax.random.normal(keys[0], (BLOCKS, HIDDEN, D)) / 32).astype(jnp.bfloat16)
  w2 = (jax.random.normal(keys[1], (BLOCKS, D, HIDDEN)) / 64).astype(jnp.bfloat16)
  b1, b2 = jnp.zeros((BLOCKS, HIDDEN), jnp.bfloat16), jnp.zeros((BLOCKS, D), jnp.bfloat16)
  scale, shift = jnp.ones((D,)), jnp.zeros((D,))
  x0 = jax.random.normal(keys[2], (args.batch, 1, D))

  def fused(x, block_n, block_k, num_warps):
    blocks = dict(block_n=block_n, block_k=block_k, num_warps=num_warps)
    for i in range(BLOCKS):
      h = fused_dense(x, w1[i], b1[i], norm=Norm("layer", scale, shift), activation="relu",
                      **blocks)
      x = fused_dense(h, w2[i], b2[i], residual=x, **blocks)
    return x

  def xla(x):
    for i in range(BLOCKS):
      n = jax.nn.standardize(x, axis=-1, epsilon=1e-6) * scale + shift
      h = jax.nn.relu(jnp.dot(n.astype(jnp.bfloat16), w1[i].T) + b1[i])
      x = x + (jnp.dot(h, w2[i].T) + b2[i]).astype(jnp.float32)
    return x

  def bench(fn):
    fn = jax.jit(fn)
    y = jax.block_until_ready(fn(x0))
    times = []
    for _ in range(5):
      start = time.perf_counter()
      for _ in range(100):
        y = fn(x0)
      jax.block_until_ready(y)
      times.append((time.perf_counter() - start) / 100 / (2 * BLOCKS) * 1e6)
    return statistics.median(times), y

  xla_us, reference = bench(xla)
  rows = [dict(variant="xla", us_per_product=xla_us, rel_diff=0.0)]
  for block_n, block_k, num_warps in CONFIGS:
    us, y = bench(functools.partial(fused, block_n=block_n, block_k=block_k,
                                    num_warps=num_warps))
    rows.append(dict(variant=f"fused block_n={block_n} block_k={block_k} warps={num_warps}",
                     us_per_product=us,
                     rel_diff=float(jnp.max(jnp.abs(y - reference)) / jnp.max(jnp.abs(reference)))))
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  Path(args.out).write_text(json.dumps(dict(device=jax.devices()[0].device_kind,
                                            jax=jax.__version__, batch=args.batch, rows=rows),
                                       indent=1))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}")
  for row in rows:
    print(f"{row['variant']:40s} {row['us_per_product']:8.2f} us/product  "
          f"max diff {row['rel_diff']:.1e}  ({row['us_per_product'] / xla_us:.2f}x XLA)")


if __name__ == "__main__":
  main()
