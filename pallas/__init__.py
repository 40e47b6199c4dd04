"""Gated linear-attention scan ops: Pallas GPU kernels and their pure-JAX references."""
