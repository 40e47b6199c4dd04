"""Per-kernel cost of fused_dense at batch 1 vs XLA: a chain of 16 dependent products per call."""
import time, functools, json, os, sys
import jax, jax.numpy as jnp, numpy as np
from pallas.fused_dense import fused_dense, Norm
D, H4 = 1024, 4096
key = jax.random.key(0)
ks = jax.random.split(key, 4)
w1 = (jax.random.normal(ks[0], (8, H4, D)) / 32).astype(jnp.bfloat16)
w2 = (jax.random.normal(ks[1], (8, D, H4)) / 64).astype(jnp.bfloat16)
b1 = jnp.zeros((8, H4), jnp.bfloat16); b2 = jnp.zeros((8, D), jnp.bfloat16)
scale = jnp.ones((D,)); nb = jnp.zeros((D,))
x0 = jax.random.normal(ks[2], (int(sys.argv[1]) if len(sys.argv) > 1 else 1, 1, D))

def fused(x, bn, bk, nw):
  for i in range(8):
    h = fused_dense(x, w1[i], b1[i], norm=Norm("layer", scale, nb), activation="relu", block_n=bn, block_k=bk, num_warps=nw)
    x = fused_dense(h, w2[i], b2[i], residual=x, block_n=bn, block_k=bk, num_warps=nw)
  return x

def xla(x):
  for i in range(8):
    n = jax.nn.standardize(x, axis=-1, epsilon=1e-6) * scale + nb
    h = jax.nn.relu(jnp.dot(n.astype(jnp.bfloat16), w1[i].T) + b1[i])
    x = x + (jnp.dot(h, w2[i].T) + b2[i]).astype(jnp.float32)
  return x

def bench(f):
  f = jax.jit(f)
  y = f(x0); y.block_until_ready()
  ts = []
  for _ in range(5):
    t = time.perf_counter()
    for _ in range(100):
      y = f(x0)
    y.block_until_ready()
    ts.append((time.perf_counter() - t) / 100 / 16 * 1e6)
  return float(np.median(ts)), y

rows = []
base, yx = bench(xla)
rows.append(("xla", base, 0.0))
print("xla", base, flush=True)
for bn, bk, nw in ((16, 512, 4), (8, 1024, 4), (32, 256, 4), (16, 512, 8), (4, 1024, 2)):
  t, y = bench(functools.partial(fused, bn=bn, bk=bk, nw=nw))
  err = float(jnp.max(jnp.abs(y - yx)) / jnp.max(jnp.abs(yx)))
  rows.append((f"fused bn={bn} bk={bk} w={nw}", t, err))
  print(rows[-1], flush=True)
for name, t, err in rows:
  print(f"{name:28s} {t:8.2f} us/kernel  rel diff {err:.1e}")
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), f"sweep_b{x0.shape[0]}.json"), "w"))
