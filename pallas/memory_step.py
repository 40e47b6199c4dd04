"""The CLAM memory's one-frame step as two Pallas GPU (Triton) kernels.

`memory_update` advances the state of every memory layer by one frame and reads layer 0's tokens
out of its new state; `memory_readout` reads any layer's tokens out of a state. One program per
(batch, head, DV block) holds a DK x block_v slice of the state in registers: at batch 1 a (batch,
head) grid is too few programs, each holding a whole DK x DV float32 state (128 x 128 at EK100) that
spills registers. Both the update and the read-out q[m] S[:, block] are independent per DV block.
The semantics are those of `clam_jax.clam.CrossLinearAttention` on one unmasked frame (T = 1) with
memory_normalize=False:
    S = diag(exp g) S + phi(k)^T v,  g = log_sigmoid(gate) / gate_temperature,
    o[m] = DK^-1/2 phi(q[m]) S,
with the projections laid out as `clam_jax.streaming._merged_memory` computes them. phi is applied
in float32 (the model applies it in the compute dtype: the same in float32, within one rounding of
the compute dtype otherwise). The pure-JAX `*_reference` functions state the semantics.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas import checks
from pallas.kernel_call import KernelCall, interpret_default, launch, without_program_id

FEATURE_MAPS = ("identity", "elu1")
# One step, nothing to pipeline.
_NUM_STAGES = 1


def _shape(x):
  return tuple(x.shape)


def _check_power_of_two(name, dim_name, size, shape):
  # Triton loads only power-of-two blocks; padding here would cost a copy per frame.
  if not checks.is_power_of_two(size):
    raise ValueError(f"{name}: {dim_name} = {size} must be a power of two, got shape {shape}")


def _block_v(block_v, dv):
  """block_v checked (a power of two, like every Triton block) and capped at DV."""
  if not checks.is_power_of_two(block_v):
    raise ValueError(f"block_v must be a power of two, got {block_v}")
  return min(block_v, dv)


def _check_feature_map(feature_map):
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def _check_state(name, state, b, h, dk):
  """state must be (b, h, dk, dk) float32 (DV = DK: memory_normalize's DK + 1 is unsupported)."""
  shape = _shape(state)
  if state.ndim != 4 or shape[-1] != shape[-2]:
    raise ValueError(f"{name} must have shape (B, H, DK, DV) with DV = DK (memory_normalize=True "
                     f"is not supported), got {shape}")
  if shape != (b, h, dk, dk):
    raise ValueError(f"{name} must have shape (B, H, DK, DK) = {(b, h, dk, dk)}, got {shape}")
  if state.dtype != jnp.float32:
    raise ValueError(f"{name} must be float32, got {state.dtype}")


def _phi(feature_map, x):
  """phi of a float32 array; elu(x) + 1 as where(x > 0, x + 1, exp x): one exp, no expm1."""
  return jnp.where(x > 0, x + 1, jnp.exp(x)) if feature_map == "elu1" else x


def _log_sigmoid(x):
  """log sigmoid x = min(x, 0) - log(1 + exp(-|x|)): no overflow for either sign."""
  return jnp.minimum(x, 0) - jnp.log1p(jnp.exp(-jnp.abs(x)))


def _read_out(q_ref, s, o_ref, *, feature_map, use_dot, interpret):
  """o_ref (M, block_v) = DK^-1/2 phi(q) s for the queries q_ref (M, DK) and the float32 state
  slice s (DK, block_v).

  With tl.dot the M queries are one tile contracted by three TF32 products (about float32
  accuracy; the CPU of interpret mode has only plain float32 products). Without it they are M
  rows, each a 2-D broadcast and reduction in the state's own layout.
  """
  scale = q_ref.shape[-1] ** -0.5
  if use_dot:
    precision = (lax.Precision.HIGHEST if interpret
                 else lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
    q = _phi(feature_map, q_ref[...].astype(jnp.float32))
    o = lax.dot_general(q, s, (((1,), (0,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)
    o_ref[...] = (scale * o).astype(o_ref.dtype)
  else:
    for i in range(q_ref.shape[0]):
      q = _phi(feature_map, q_ref[i].astype(jnp.float32))
      o_ref[i] = (scale * jnp.sum(q[:, None] * s, axis=0)).astype(o_ref.dtype)


def _use_dot(m, dk, block_v):
  return min(m, dk, block_v) >= checks.MIN_DOT_DIM


def _update_kernel(frames_ref, queries_ref, *refs, num_layers, num_heads, gate_temperature,
                   feature_map, read_out, program_id):
  """Refs: frames (3 L D,), queries (M, DK), L state slices in (DK, block_v); writes o (M,
  block_v), L state slices."""
  states_in, o_ref, states_out = refs[:num_layers], refs[num_layers], refs[num_layers + 1:]
  dk = queries_ref.shape[-1]
  block_v = o_ref.shape[-1]
  head = program_id(1)
  v_offset = program_id(2) * block_v

  def load(layer, j, offset=0, size=dk):
    """Columns [offset, offset + size) of block j (key, value, gate) of this head of `layer`."""
    start = pl.multiple_of(((3 * layer + j) * num_heads + head) * dk + offset, size)
    return frames_ref[pl.ds(start, size)].astype(jnp.float32)

  # Layer 0 last: its new state goes straight to the read-out, one state live at a time.
  for layer in reversed(range(num_layers)):
    k = _phi(feature_map, load(layer, 0))
    v = load(layer, 1, v_offset, block_v)  # this program's DV block of the value
    g = _log_sigmoid(load(layer, 2)) / gate_temperature
    s = jnp.exp(g)[:, None] * states_in[layer][...] + k[:, None] * v[None, :]
    states_out[layer][...] = s
  read_out(queries_ref, s, o_ref)


def memory_update(frames, states, queries, *, num_heads, gate_temperature, feature_map="identity",
                  block_v=32, num_warps=4, interpret=None):
  """Every memory layer's state advanced by one frame, and layer 0's read-out of its new state:
  `launch(memory_update_call(...))`.

  frames: (B, L * 3 * D) compute dtype, the merged frame projection: for layer l = 0..L-1 the key,
    value and gate (each D = H * DK, head-major) at columns (3 l + j) * D, j = 0, 1, 2 (the layout
    of `streaming._merged_memory`'s frames before its reshape).
  states: a tuple of L float32 (B, H, DK, DV) states with DV = DK = D / H.
  queries: (M, H, DK) compute dtype, layer 0's cross-attention query projections (the same for
    every batch element).
  num_heads: H; gate_temperature: tau > 0; feature_map: phi, "identity" or "elu1" (elu + 1);
  block_v: DV columns of the state per program (a power of two, capped at DV); num_warps: Triton
  warps per program; interpret: Pallas interpret mode (None: when the default backend is not a
  GPU).

  Per layer l, batch b and head h: S_l = diag(exp g) S_l + phi(k)^T v with
  g = log_sigmoid(gate) / tau; then o0[b, m, h] = DK^-1/2 phi(queries[m, h]) S_0[b, h].
  Returns (o0 (B, M, D) in frames' dtype, heads concatenated head-major, the tuple of new states).
  The state outputs alias their inputs (donate them under jit to update in place). M and DK must
  be powers of two.
  """
  return launch(memory_update_call(
      frames, states, queries, num_heads=num_heads, gate_temperature=gate_temperature,
      feature_map=feature_map, block_v=block_v, num_warps=num_warps, interpret=interpret))


def memory_update_call(frames, states, queries, *, num_heads, gate_temperature,
                       feature_map="identity", block_v=32, num_warps=4, interpret=None):
  """`memory_update` as a KernelCall (same arguments and result)."""
  _check_feature_map(feature_map)
  states = tuple(states)
  num_layers = len(states)
  if not num_layers:
    raise ValueError("states must hold one state per memory layer, got none")
  if frames.ndim != 2 or frames.shape[1] % (3 * num_layers * num_heads):
    raise ValueError(f"frames must have shape (B, L * 3 * D) with L = {num_layers} states and D a "
                     f"multiple of num_heads = {num_heads}, got {_shape(frames)}")
  b, width = frames.shape
  dk = width // (3 * num_layers * num_heads)
  for i, state in enumerate(states):
    _check_state(f"states[{i}]", state, b, num_heads, dk)
  if queries.ndim != 3 or _shape(queries)[1:] != (num_heads, dk):
    raise ValueError(f"queries must have shape (M, H, DK) with (H, DK) = {(num_heads, dk)}, got "
                     f"{_shape(queries)}")
  m = queries.shape[0]
  _check_power_of_two("queries", "M", m, _shape(queries))
  _check_power_of_two("states", "DK", dk, _shape(states[0]))
  if not gate_temperature > 0:
    raise ValueError(f"gate_temperature must be > 0, got {gate_temperature}")
  block_v = _block_v(block_v, dk)
  num_v_blocks = dk // block_v
  interpret = interpret_default(interpret)
  read_out = functools.partial(_read_out, feature_map=feature_map,
                               use_dot=_use_dot(m, dk, block_v), interpret=interpret)
  kernel = functools.partial(_update_kernel, num_layers=num_layers, num_heads=num_heads,
                             gate_temperature=float(gate_temperature), feature_map=feature_map,
                             read_out=read_out)
  # The whole frame row per program: the kernel slices its head's (DK,) blocks out of the ref, so
  # the row's own length need not be a power of two.
  frames_spec = pl.BlockSpec((None, width), lambda i, h, j: (i, 0))
  queries_spec = pl.BlockSpec((m, None, dk), lambda i, h, j: (0, h, 0))
  state_spec = pl.BlockSpec((None, None, dk, block_v), lambda i, h, j: (i, h, 0, j))
  # Head h's DV block j: o's columns h DK + j block_v, counted in blocks of block_v.
  o_spec = pl.BlockSpec((None, m, block_v), lambda i, h, j: (i, 0, h * num_v_blocks + j))
  return KernelCall(
      kernel=kernel,
      grid=(b, num_heads, num_v_blocks),
      in_specs=[frames_spec, queries_spec] + [state_spec] * num_layers,
      out_specs=[o_spec] + [state_spec] * num_layers,
      out_shape=[jax.ShapeDtypeStruct((b, m, num_heads * dk), frames.dtype)]
      + [jax.ShapeDtypeStruct(state.shape, jnp.float32) for state in states],
      operands=(frames, queries, *states),
      finish=lambda outputs: (outputs[0], tuple(outputs[1:])),
      input_output_aliases={2 + i: 1 + i for i in range(num_layers)},
      num_warps=num_warps, num_stages=_NUM_STAGES,
      interpret=interpret,
      name="memory_update")


def _readout_kernel(q_ref, s_ref, o_ref, *, read_out):
  """Refs: q (M, DK), s (DK, block_v); writes o (M, block_v)."""
  read_out(q_ref, s_ref[...], o_ref)


def memory_readout(q, state, *, feature_map="identity", block_v=32, num_warps=4, interpret=None):
  """The read-out of M tokens from one memory layer's state: `launch(memory_readout_call(...))`.

  q: (B, M, D) compute dtype, the tokens' query projections (H heads of DK, head-major);
  state: (B, H, DK, DV) float32 with DV = DK = D / H; feature_map: phi, "identity" or "elu1";
  block_v: DV columns of the state per program (a power of two, capped at DV); num_warps: Triton
  warps per program; interpret: Pallas interpret mode (None: when the default backend is not a
  GPU).
  Returns o (B, M, D) in q's dtype: o[b, m, h] = DK^-1/2 phi(q[b, m, h]) state[b, h]. M and DK
  must be powers of two.
  """
  return launch(memory_readout_call(q, state, feature_map=feature_map, block_v=block_v,
                                    num_warps=num_warps, interpret=interpret))


def memory_readout_call(q, state, *, feature_map="identity", block_v=32, num_warps=4,
                        interpret=None):
  """`memory_readout` as a KernelCall (same arguments and result)."""
  _check_feature_map(feature_map)
  if q.ndim != 3:
    raise ValueError(f"q must have rank 3 (B, M, D), got shape {_shape(q)}")
  if state.ndim != 4 or q.shape[2] != state.shape[1] * state.shape[2]:
    raise ValueError(f"state must have shape (B, H, DK, DV) with H * DK = D of q {_shape(q)}, got "
                     f"{_shape(state)}")
  b, m, _ = q.shape
  h, dk = state.shape[1:3]
  _check_state("state", state, b, h, dk)
  _check_power_of_two("q", "M", m, _shape(q))
  _check_power_of_two("state", "DK", dk, _shape(state))
  block_v = _block_v(block_v, dk)
  num_v_blocks = dk // block_v
  interpret = interpret_default(interpret)
  read_out = functools.partial(_read_out, feature_map=feature_map,
                               use_dot=_use_dot(m, dk, block_v), interpret=interpret)
  # Head h's queries (all DK) and its DV block j of o, in q's and o's (B, M, D) layout.
  q_spec = pl.BlockSpec((None, m, dk), lambda i, hd, j: (i, 0, hd))
  state_spec = pl.BlockSpec((None, None, dk, block_v), lambda i, hd, j: (i, hd, 0, j))
  o_spec = pl.BlockSpec((None, m, block_v), lambda i, hd, j: (i, 0, hd * num_v_blocks + j))
  return KernelCall(
      kernel=without_program_id(functools.partial(_readout_kernel, read_out=read_out)),
      grid=(b, h, num_v_blocks),
      in_specs=[q_spec, state_spec],
      out_specs=[o_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
      operands=(q, state),
      finish=lambda outputs: outputs[0],
      num_warps=num_warps, num_stages=_NUM_STAGES,
      interpret=interpret,
      name="memory_readout")


def _feature_map_reference(feature_map, x):
  return jax.nn.elu(x) + 1 if feature_map == "elu1" else x


def memory_readout_reference(q, state, *, feature_map="identity"):
  """Pure-JAX `memory_readout`: q (B, M, D), state (B, H, DK, DV) float32 -> (B, M, D) q.dtype."""
  b, m, _ = q.shape
  h, dk = state.shape[1:3]
  phi_q = _feature_map_reference(feature_map, q.reshape(b, m, h, dk).astype(jnp.float32))
  o = dk ** -0.5 * jnp.einsum("bmhk,bhkv->bmhv", phi_q, state, precision="highest")
  return o.reshape(q.shape).astype(q.dtype)


def memory_update_reference(frames, states, queries, *, num_heads, gate_temperature,
                            feature_map="identity"):
  """Pure-JAX `memory_update` (same arguments and outputs)."""
  b = frames.shape[0]
  dk = states[0].shape[2]
  blocks = frames.reshape(b, len(states), 3, num_heads, dk).astype(jnp.float32)
  new_states = []
  for layer, state in enumerate(states):
    k = _feature_map_reference(feature_map, blocks[:, layer, 0])
    v = blocks[:, layer, 1]
    g = jax.nn.log_sigmoid(blocks[:, layer, 2]) / gate_temperature
    new_states.append(jnp.exp(g)[..., None] * state + k[..., :, None] * v[..., None, :])
  q = jnp.broadcast_to(queries, (b,) + queries.shape).reshape(b, queries.shape[0], -1)
  o = memory_readout_reference(q, new_states[0], feature_map=feature_map)
  return o.astype(frames.dtype), tuple(new_states)
