"""pallas.kernel_call (Pallas interpret mode): independent kernels launched side by side in one
pallas_call give exactly what each gives launched alone (grids of different ranks and sizes, a
K-split epilogue, aliased state outputs, a masked attention), and run_side_by_side advances
generator branches in lockstep."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas import kernel_call
from pallas.fused_dense import Blocks, Norm, fused_dense_call
from pallas.memory_step import memory_update_call
from pallas.small_attention import small_attention_call


def _calls(rng):
  """Three independent KernelCalls on fresh random inputs: a normalised product with K split in
  two (grid (3, 2, 2), an XLA epilogue), a memory update whose states alias its outputs (grid
  (2, 2, 1)) and a masked attention (grid (2, 4))."""
  f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  product = fused_dense_call(
      f32(2, 4, 64), f32(48, 64), f32(48), norm=Norm("layer", f32(64), f32(64)),
      residual=f32(2, 4, 48), blocks=Blocks(block_n=16, block_k=16, split_k=2))
  update = memory_update_call(f32(2, 3 * 2 * 16), (f32(2, 2, 8, 8), f32(2, 2, 8, 8)),
                              f32(4, 2, 8), num_heads=2, gate_temperature=0.5)
  mask = jnp.asarray(rng.random((2, 8)) < 0.7).at[:, 0].set(True)
  attention = small_attention_call(f32(2, 2, 32), f32(2, 8, 64), f32(2, 8, 64), num_heads=4,
                                   width=32, column_blocks=(0, 1, 0), mask=mask)
  return [product, update, attention]


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_side_by_side_equals_each_launched_alone():
  calls = _calls(np.random.default_rng())
  alone = [kernel_call.launch(call) for call in calls]
  _assert_equal(kernel_call.launch_side_by_side(calls), alone)
  _assert_equal(kernel_call.launch_side_by_side(calls[::-1]), alone[::-1])
  # Under jit too, where the aliased state buffers are reused.
  _assert_equal(jax.jit(lambda: kernel_call.launch_side_by_side(calls))(), alone)


def test_run_side_by_side_launches_one_call_of_each_branch_per_round(monkeypatch):
  calls = _calls(np.random.default_rng())
  rounds = []
  launch = kernel_call.launch_side_by_side
  monkeypatch.setattr(kernel_call, "launch_side_by_side",
                      lambda batch: rounds.append([c.name for c in batch]) or launch(batch))

  def chain(*chain_calls):
    results = []
    for call in chain_calls:
      results.append((yield call))
    return results

  results = kernel_call.run_side_by_side(chain(calls[0], calls[1]), chain(calls[2]), chain())
  assert rounds == [[calls[0].name, calls[2].name], [calls[1].name]]
  _assert_equal(results, [[kernel_call.launch(calls[0]), kernel_call.launch(calls[1])],
                          [kernel_call.launch(calls[2])], []])


def test_calls_side_by_side_must_agree_on_interpret_mode():
  calls = _calls(np.random.default_rng())
  with pytest.raises(ValueError, match="interpret"):
    kernel_call.launch_side_by_side([calls[0], calls[1]._replace(interpret=False)])
