"""Gated linear-attention scan ops: Pallas GPU kernels and their pure-JAX references."""

from pallas.gla import gated_linear_attention
from pallas.gla_recurrent import gla_recurrent
from pallas.state_update import state_update
