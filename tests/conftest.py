"""Shared test configuration: JAX computes in float64 unless a test asks for float32, and each test
module's compiled programs are dropped after it, so that the long slow tier does not accumulate
every executable it ever compiled in one process."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    yield
    jax.clear_caches()
