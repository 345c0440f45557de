"""Shared test configuration: JAX computes in float64 unless a test asks for float32."""

import jax

jax.config.update("jax_enable_x64", True)
