"""Pallas kernels, each beside its pure-JAX reference (installed as `clawjax.kernels`)."""
