"""Tuning sweep of the chunked GLA kernels: each Pallas kernel timed alone, per launch setting.

Usage (GPU):  SWEEP_BUDGET_S=300 python3 benchmarks/chunked_sweep.py
              (JAX_PLATFORMS=cpu: B = 1, T = 128 in interpret mode, a check that the script runs)

First checks gla_chunked against the lax.scan reference on the GPU (M = 1 and 16, mild gates that
take the one-matmul path and strong ones that take the one-by-one path). Then, at B = 64, T = 4096,
H = 8, DK = DV = 128, bfloat16, for several (M, chunk, query-block steps): the op's forward and
forward+backward at the current LAUNCH table, the two chunk-walking kernels alone, and the output,
dq and dkv kernels alone for each (num_warps, num_stages). It calls the module's private kernel
wrappers on purpose: this is how pallas/gla_chunked.py's LAUNCH table and block sizes were chosen
(benchmarks/RESULTS.md). Stops starting new settings after SWEEP_BUDGET_S seconds; writes
$OUT/chunked_sweep.json (OUT defaults to /tmp).
"""
import itertools, json, os, statistics, sys, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import jax, jax.numpy as jnp, numpy as np
from pallas import gla_chunked as gc
from pallas import reference

H, D = 8, 128
BUDGET = float(os.environ.get("SWEEP_BUDGET_S", "300"))
T0 = time.time()
print(jax.devices(), jax.__version__, flush=True)
CPU = jax.default_backend() == 'cpu'
B, T = (1, 128) if CPU else (64, 4096)

def bench(f, args, n=10):
  jax.block_until_ready(f(*args)); ts = []
  for _ in range(n):
    t0 = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(ts)

def inputs(b, t, m, chunk):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (b, t * m, H, D), bf); k = jax.random.normal(ks[1], (b, t, H, D), bf)
  v = jax.random.normal(ks[2], (b, t, H, D), bf)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, H, D)) + 3.0) / 4.0
  do = jax.random.normal(ks[4], (b, t * m, H, D), bf)
  s0 = jnp.zeros((b, H, D, D), jnp.float32)
  return q, k, v, g, gc._local_cumsum(g, chunk), do, s0

# correctness on GPU: M = 1 and 16, mild gates (one-matmul path) and strong ones (loop path)
for m, gates in ((1, 3.0), (1, -12.0), (16, 3.0), (16, -12.0)):
  ks = jax.random.split(jax.random.PRNGKey(1), 5)
  q = jax.random.normal(ks[0], (2, 300, m, 2, 128), jnp.bfloat16); k = jax.random.normal(ks[1], (2, 300, 2, 128), jnp.bfloat16)
  v = jax.random.normal(ks[2], (2, 300, 2, 128), jnp.bfloat16)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (2, 300, 2, 128)) + gates)
  w = jax.random.normal(ks[4], (2, 300, m, 2, 128))
  loss = lambda f: (lambda q, k, v, g: jnp.sum(f(q, k, v, g).astype(jnp.float32) * w))
  ref = jax.jit(jax.value_and_grad(loss(reference.gla_reference), (0, 1, 2, 3)))(q, k, v, g)
  got = jax.jit(jax.value_and_grad(loss(lambda *a: gc.gla_chunked(*a, interpret=CPU)), (0, 1, 2, 3)))(q, k, v, g)
  rel = lambda a, b: float(np.linalg.norm(np.float64(a) - np.float64(b)) / np.linalg.norm(np.float64(b)))
  print("check M", m, "gates", gates, "loss rel", rel(got[0], ref[0]), "grads rel", [round(rel(a, b), 5) for a, b in zip(got[1], ref[1])], flush=True)

results = []
def run(label, fn, args):
  try:
    ms = bench(jax.jit(fn), args)
  except Exception as e:  # noqa
    ms = float('nan'); print(label, 'FAILED', type(e).__name__, str(e)[:200], flush=True)
  results.append(dict(label=label, ms=ms)); print(f"{label:60s} {ms:8.3f} ms", flush=True)
  return ms

NAMES = {"output": "gla_chunked_output", "dq": "gla_chunked_dq", "dkv": "gla_chunked_dkv"}
DEFAULT = dict(gc.LAUNCH)
for m, chunk, sub in ((1, 64, 64), (16, 64, 4), (1, 64, 16), (16, 64, 1), (16, 64, 8), (1, 128, 64), (1, 128, 128)):
  if time.time() - T0 > BUDGET: break
  gc.LAUNCH.clear(); gc.LAUNCH.update(DEFAULT)
  base = gc._Config(m=m, scale=D ** -0.5, chunk=chunk, steps=sub, block_v=128, interpret=CPU)
  q, k, v, g, b_, do, s0 = inputs(B, T, m, chunk)
  def fwdbwd(q, k, v, g, s0, do):
    (o, st), vjp = jax.vjp(lambda *a: gc._gla(*a, base), q, k, v, g, s0)
    return o, vjp((do, st))
  tag = f"M={m} C={chunk} S={sub}"
  run(f"{tag} fwd (defaults)", lambda q, k, v, g, s0: gc._gla(q, k, v, g, s0, base), (q, k, v, g, s0))
  run(f"{tag} fwd+bwd (defaults)", fwdbwd, (q, k, v, g, s0, do))
  h, st = jax.jit(lambda k, v, b_, s0: gc._states(k, v, b_, s0, base))(k, v, b_, s0)
  dh, _ = jax.jit(lambda q, do, b_, st: gc._dstates(q, do, b_, st, base))(q, do, b_, st)
  run(f"{tag} states  ", lambda k, v, b_, s0: gc._states(k, v, b_, s0, base), (k, v, b_, s0))
  run(f"{tag} dstates ", lambda q, do, b_, st: gc._dstates(q, do, b_, st, base), (q, do, b_, st))
  calls = {
      "output": (lambda q, k, v, b_, h, cfg: gc._output(q, k, v, b_, h, cfg), (q, k, v, b_, h)),
      "dq": (lambda q, do, k, v, b_, h, dh, cfg: gc._dq(q, do, k, v, b_, h, dh, cfg), (q, do, k, v, b_, h, dh)),
      "dkv": (lambda q, k, v, b_, do, dh, cfg: gc._dkv(q, k, v, b_, do, dh, cfg), (q, k, v, b_, do, dh)),
  }
  for kern, (fn, args) in calls.items():
    for w, s in itertools.product((4, 8), (2, 3)):
      if time.time() - T0 > BUDGET: break
      gc.LAUNCH[NAMES[kern]] = (w, s)
      run(f"{tag} {kern:8s} w={w} s={s}", lambda *a, fn=fn: fn(*a, base), args)
    gc.LAUNCH[NAMES[kern]] = DEFAULT[NAMES[kern]]
out = os.environ.get("OUT", "/tmp")
json.dump(results, open(f"{out}/chunked_sweep.json", "w"), indent=1)
print("done in", time.time() - T0, flush=True)
