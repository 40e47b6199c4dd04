"""Per-call cost of the batch-1 stream_step (EK100 model): blocked, not donated, unblocked loop.

Usage (GPU):  python3 benchmarks/stream_dispatch.py
              XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 benchmarks/stream_dispatch.py
Prints the median ms of 300 calls blocked one by one (state donated / not donated) and the mean ms
per call of 300 calls dispatched without blocking (host work overlapping the GPU's).
"""
import os, statistics, sys, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
import jax, jax.numpy as jnp
from configs import ek100
from clam_jax import model as model_lib, streaming
cfg = ek100.get_config().model
print(jax.devices()[0].device_kind, jax.__version__, "XLA_FLAGS=", os.environ.get("XLA_FLAGS"), flush=True)
b = 1
feats = {"rgb": jnp.ones((b, 4, 1024))}
variables = model_lib.CLAM(cfg).init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, feats, jnp.ones((b, 4), bool), train=False)
params = variables["params"]
print("param leaves", len(jax.tree.leaves(params)), flush=True)
state = streaming.init_stream_state(cfg, b)
step = streaming.make_stream_step(cfg)
frame = {"rgb": jax.random.normal(jax.random.PRNGKey(2), (b, 1024))}
def timeit(name, f, state, n=300):
  for _ in range(5): state, out = f(params, state, frame)
  jax.block_until_ready(state); ts = []
  for _ in range(n):
    t0 = time.perf_counter(); state, out = f(params, state, frame); jax.block_until_ready((state, out)); ts.append(time.perf_counter() - t0)
  print(f"{name:40s} {1e3 * statistics.median(ts):.3f} ms", flush=True)
  return state
state = timeit("step donated", jax.jit(step, donate_argnums=1), state)
state = timeit("step not donated", jax.jit(step), state)
# no blocking per call: pipelined dispatch, the per-frame throughput of a python loop
f = jax.jit(step, donate_argnums=1)
for _ in range(5): state, out = f(params, state, frame)
jax.block_until_ready(state); t0 = time.perf_counter()
for _ in range(300): state, out = f(params, state, frame)
jax.block_until_ready(state); print(f"{'step donated, unblocked loop':40s} {1e3 * (time.perf_counter() - t0) / 300:.3f} ms", flush=True)
