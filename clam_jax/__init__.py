"""CLAM: Cross Linear Attentive Memory for video action anticipation, in JAX/Flax."""
