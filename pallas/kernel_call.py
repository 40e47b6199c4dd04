"""A pallas_call as a value: `launch` runs one; `launch_side_by_side` runs independent ones in one.

At batch 1 a kernel of the streaming step is latency-bound: a product of 2-12 MB takes a fixed
~2 us plus its bytes, and XLA runs the kernels of a loop body one after another, even where two
branches of the step do not depend on each other. `launch_side_by_side` puts independent calls in
one grid: program p runs the call whose block of the flat grid holds p, so the calls share the
GPU and one launch's fixed cost. On an H100 a shared launch took about as long as the longer of
its kernels where the other was short, and about their sum where both streamed several MB of
weights (benchmarks/RESULTS.md, session 14).

Kernel bodies take their refs (inputs, then outputs, as pallas_call passes them) and a keyword
`program_id`, a function of the grid axis standing in for `pl.program_id`, since a body run side
by side sees its own call's grid, not the shared one.
"""

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


class KernelCall(NamedTuple):
  """One pallas_call (Triton), described. kernel(*refs, program_id): the body; out_specs and
  out_shape: lists (one entry per output); finish: the call's list of outputs -> its result (an
  epilogue in XLA, or a regrouping)."""
  kernel: Callable
  grid: tuple[int, ...]
  in_specs: list
  out_specs: list
  out_shape: list
  operands: tuple
  finish: Callable[[list], Any]
  num_warps: int
  num_stages: int
  name: str
  interpret: bool
  input_output_aliases: dict = {}


def interpret_default(interpret):
  """Pallas interpret mode: as given, or (None) on unless the default backend is a GPU."""
  return jax.default_backend() != "gpu" if interpret is None else interpret


def without_program_id(body):
  """A body that uses no program ids, as a KernelCall.kernel."""
  return lambda *refs, program_id: body(*refs)


def launch(call):
  """Runs one KernelCall; returns call.finish(outputs)."""
  outputs = pl.pallas_call(
      functools.partial(call.kernel, program_id=pl.program_id),
      grid=call.grid,
      in_specs=list(call.in_specs),
      out_specs=list(call.out_specs),
      out_shape=list(call.out_shape),
      input_output_aliases=dict(call.input_output_aliases),
      compiler_params=plgpu.CompilerParams(num_warps=call.num_warps, num_stages=call.num_stages),
      interpret=call.interpret,
      name=call.name,
  )(*call.operands)
  return call.finish(list(outputs))


def _unravel(index, grid):
  """The grid coordinates of a flat (row-major) program index."""
  coordinates = []
  for size in reversed(grid):
    coordinates.append(index % size)
    index = index // size
  return tuple(reversed(coordinates))


def launch_side_by_side(calls):
  """Runs independent KernelCalls in one pallas_call; returns [call.finish(outputs) per call]."""
  calls = list(calls)
  return [launch(calls[0])] if len(calls) == 1 else launch(joined(calls))


def joined(calls):
  """One KernelCall that runs independent calls side by side; its result is [call.finish(outputs)
  per call].

  The grid is flat: call i owns programs [offset_i, offset_i + prod(grid_i)), each running call
  i's body on its own grid coordinates. Block index maps see their call's coordinates (clamped
  into its range in the other calls' programs, where no body touches them). The launch takes the
  largest num_warps and num_stages of the calls. No call may read another's outputs.
  """
  if len({call.interpret for call in calls}) != 1:
    raise ValueError(f"calls side by side must agree on interpret mode, got "
                     f"{[call.interpret for call in calls]}")
  sizes = [math.prod(call.grid) for call in calls]
  offsets = np.cumsum([0] + sizes[:-1]).tolist()

  def coordinates(program, i):
    return _unravel(jnp.clip(program - offsets[i], 0, sizes[i] - 1), calls[i].grid)

  def remapped(spec, i):
    return dataclasses.replace(
        spec, index_map=lambda program: spec.index_map(*coordinates(program, i)))

  in_specs, out_specs, out_shape, operands, aliases, ref_slices = [], [], [], [], {}, []
  num_inputs = sum(len(call.in_specs) for call in calls)
  for i, call in enumerate(calls):
    for source, target in call.input_output_aliases.items():
      aliases[len(in_specs) + source] = len(out_specs) + target
    ref_slices.append((slice(len(in_specs), len(in_specs) + len(call.in_specs)),
                       slice(num_inputs + len(out_specs),
                             num_inputs + len(out_specs) + len(call.out_specs))))
    in_specs += [remapped(spec, i) for spec in call.in_specs]
    out_specs += [remapped(spec, i) for spec in call.out_specs]
    out_shape += list(call.out_shape)
    operands += list(call.operands)

  def run_call(i, refs, program):
    inputs, outputs = ref_slices[i]

    @pl.when((program >= offsets[i]) & (program < offsets[i] + sizes[i]))
    def _():
      calls[i].kernel(*refs[inputs], *refs[outputs],
                      program_id=lambda axis: coordinates(program, i)[axis])

  def body(*refs, program_id):
    for i in range(len(calls)):
      run_call(i, refs, program_id(0))

  def finish(outputs):
    return [call.finish(outputs[sliced.start - num_inputs:sliced.stop - num_inputs])
            for call, (_, sliced) in zip(calls, ref_slices)]

  return KernelCall(
      kernel=body, grid=(sum(sizes),), in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, operands=tuple(operands), finish=finish,
      num_warps=max(call.num_warps for call in calls),
      num_stages=max(call.num_stages for call in calls),
      name="_with_".join(call.name for call in calls), interpret=calls[0].interpret,
      input_output_aliases=aliases)


def run_side_by_side(*branches):
  """Runs branches, generators that yield KernelCalls and are sent back their results, in
  lockstep: each round launches the next call of every unfinished branch side by side. Returns
  the branches' return values."""
  results, pending = [None] * len(branches), {}

  def advance(i, step):
    try:
      pending[i] = step()
    except StopIteration as stop:
      pending.pop(i, None)
      results[i] = stop.value

  for i, branch in enumerate(branches):
    advance(i, branch.__next__)
  while pending:
    order = list(pending)
    for i, output in zip(order, launch_side_by_side([pending[i] for i in order])):
      advance(i, functools.partial(branches[i].send, output))
  return results
