"""float64 for derive's JAX work, without touching JAX's global configuration.

derive computes in float64 (design.md, "Contracts") but must leave a user's process as it found it:
a float32 pipeline beside derive stays float32. So nothing sets ``jax_enable_x64`` globally; every
public entry point that runs JAX does its work inside the thread-local context
``jax.enable_x64(True)`` (``jax.experimental.enable_x64`` on older JAX) through :func:`float64`,
and callables handed back to the user (compiled activations, generated functions, trained
networks) are wrapped the same way, so they compute in float64 whenever they are called. The
``derive`` command runs in its own process and enables float64 for it with ``JAX_ENABLE_X64``
(:func:`cli.main`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable


def x64():
    """A context in which JAX creates and computes float64 arrays (thread-local, restored on exit)."""
    import jax

    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # JAX < 0.5
        from jax.experimental import enable_x64 as enable
    return enable(True)


def float64(fn: Callable) -> Callable:
    """``fn`` run inside :func:`x64`: its JAX arrays are float64 unless it asks for float32."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with x64():
            return fn(*args, **kwargs)

    run.__wrapped_float64__ = True
    return run


__all__ = ["float64", "x64"]
