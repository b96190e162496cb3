"""Ahead-of-time compilation of every stage's programs for TPU topologies, on a host
without a TPU: per-chip memory against HBM, FLOPs, roofline (``rlhf-jax compile``; docs/tpu.md)."""
