"""Accelerator kernels (Pallas) beside the plain-jnp paths they replace; see `sparse_attention`."""
from .sparse_attention import IMPLS, sink_softmax, sparse_gather_attention

__all__ = ["IMPLS", "sink_softmax", "sparse_gather_attention"]
