"""Gated linear attention: the one entry point the model calls; it picks an implementation."""

import jax

from pallas import checks, reference
from pallas.gla_chunked import gla_chunked
from pallas.gla_recurrent import gla_recurrent

IMPLEMENTATIONS = ("auto", "reference", "recurrent", "chunked")
# From this many steps on, "auto" takes the chunked kernels on GPU (faster than the recurrent ones
# at every shape measured on an H200; see benchmarks/RESULTS.md).
CHUNKED_MIN_STEPS = 64


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, return_final_state=False,
                           implementation="auto"):
  """S_t = diag(exp g_t) S_{t-1} + k_t^T v_t;  o_t[m] = scale * q_t[m] S_t (differentiable).

  q: (B, T, H, DK) or (B, T, M, H, DK); k, g: (B, T, H, DK) (g = log forget gate <= 0);
  v: (B, T, H, DV); initial_state: (B, H, DK, DV) or None (zeros); scale defaults to DK ** -0.5.
  Returns o with q's leading shape and DV last, in v's dtype ((B, T, H, DV) or (B, T, M, H, DV)),
  and S_T: (B, H, DK, DV) float32 if return_final_state.

  implementation: "reference" (lax.scan), "recurrent" (fused recurrent Pallas kernels), "chunked"
  (chunked Pallas kernels), or "auto": on GPU the chunked kernels from CHUNKED_MIN_STEPS steps on and
  the recurrent ones below, except for T = 1 (a streaming step), where the reference's one-step
  lax.scan becomes a few elementwise ops that XLA fuses instead of a kernel launch; the reference
  elsewhere. Off GPU, "recurrent" and "chunked" run the
  kernels in Pallas interpret mode, which is how CI (CPU only) exercises them.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  checks.check_gla_args(q, k, v, g, initial_state)
  on_gpu = jax.default_backend() == "gpu"
  if implementation == "auto":
    if not on_gpu or k.shape[1] == 1:
      implementation = "reference"
    else:
      implementation = "chunked" if k.shape[1] >= CHUNKED_MIN_STEPS else "recurrent"
  kwargs = dict(scale=scale, initial_state=initial_state, return_final_state=return_final_state)
  if implementation == "reference":
    return reference.gla_reference(q, k, v, g, **kwargs)
  kernel = gla_chunked if implementation == "chunked" else gla_recurrent
  return kernel(q, k, v, g, interpret=not on_gpu, **kwargs)
