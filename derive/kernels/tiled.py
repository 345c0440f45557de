"""The tiled method: tiles of the upper triangle through every layer while in cache, batched, written in
place and sharded over devices (:mod:`derive.kernels.gram`, items 1 and 2)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import sympy as sp
from jax import lax

from derive.backends.safe import covariance_floor
from derive.core import symbols as S
from derive.core.errors import DeriveError
from derive.kernels.direct import TRACES, _symmetrise
from derive.kernels.mehler import (
    MEHLER_ORDERS,
    _hermite_rule,
    _mehler_coefficients,
    _mehler_sum,
    _rule_points,
)
from derive.kernels.plan import _Plan
from derive.symbolic.numeric import evaluate as evaluate_numpy

#: Largest tile edge of the tiled method; a tile edge dividing N is preferred (no padding).
TILE = 256


#: Tiles processed together (one device).
TILE_BATCH = 4


def _tile_edge(n: int, tile: int | None, devices: int) -> int:
    if tile is not None:
        return max(1, min(int(tile), n))
    if n <= TILE and devices == 1:
        return n
    for t in range(min(TILE, n), TILE // 2 - 1, -1):
        if n % (t * devices) == 0:
            return t
    return min(TILE, -(-n // devices))


def _profiles(plan: _Plan, inputs, C_W, C_b, depth: int):
    """Floored diagonals K^(l)_aa, l = 1..L-1 (what the nonlinearity sees), shape (max(L-1, 1), N)."""
    d = inputs.shape[1]
    floor = covariance_floor(inputs.dtype)
    K = C_b + C_W * (jnp.sum(inputs * inputs, axis=1) / d)

    def layer(K, _):
        K = jnp.maximum(K, floor)
        E, _ = plan.diagonal(K)
        return C_b + C_W * E, K

    _, stack = lax.scan(layer, K, None, length=max(depth - 1, 1))
    return stack


def _run_tiled(plan: _Plan, key, inputs, C_W, C_b, lambda_W, lambda_b, rules, *, depth: int, tile: int,
               mesh, runs: tuple, batch: int = 1):
    """(K^(L), Theta^(L), largest relative Mehler tail of each run) by the tiled method.

    ``runs`` splits the L - 1 nonlinear layers into consecutive runs ``(length, order)`` that share
    a Mehler order (empty without Mehler nodes); ``rules`` holds each run's Gauss-Hermite rule.
    """
    TRACES[key] += 1
    n, d = inputs.shape
    dtype = inputs.dtype
    devices = 1 if mesh is None else mesh.size
    padded = -(-n // (tile * devices)) * tile * devices
    x = jnp.zeros((padded, d), dtype).at[:n].set(inputs) if padded != n else inputs
    floor = covariance_floor(dtype)
    coefs, tails = [], []
    if plan.nodes:
        # Coefficients of the N real rows only (then padded): a matrix product's rounding can
        # depend on its shape, and results must not depend on the padding (devices, tiles).
        profile = jnp.maximum(_profiles(plan, inputs, C_W, C_b, depth), floor)
        start = 0
        for (length, _), rule in zip(runs, rules):
            rule = tuple(jnp.asarray(r, dtype) for r in rule)
            c, t = _mehler_coefficients(plan.function_maps, profile[start:start + length], rule)
            coefs.append(jnp.pad(c, ((0, 0), (0, 0), (0, padded - n), (0, 0))))  # (layers, F, N, order)
            tails.append(jnp.max(t))
            start += length
    segments = tuple(runs) if plan.nodes else ((depth - 1, 0),)
    one = (jnp.ones((), dtype) + jnp.zeros((), dtype) * C_W) if plan.nodes else None
    arrays = (x, tuple(coefs))
    worst_tails = jnp.stack(tails) if tails else jnp.zeros((0,), dtype)

    def tile_maps(i0, j0, arrays, diagonal: bool):
        """K, Theta of the tile with rows i0.. and columns j0.. after all layers (i0 <= j0).

        ``diagonal``: the tile lies on the diagonal of the Gram matrix (i0 == j0). Such tiles and
        the others are compiled separately, so that only the diagonal ones floor their diagonal
        entries and are symmetrised.
        """
        x, coefs = arrays
        xr = lax.dynamic_slice_in_dim(x, i0, tile)
        xc = xr if diagonal else lax.dynamic_slice_in_dim(x, j0, tile)
        overlap = jnp.matmul(xr, xc.T, precision=lax.Precision.HIGHEST) / d
        K = C_b + C_W * overlap
        Theta = lambda_b + lambda_W * overlap
        # The diagonals of the tile's rows and columns evolve on their own (as in _profiles); they
        # are carried through the layers, so each step reads its per-row quantities from the
        # carry. (Indexing stacked per-layer arrays by the step number instead makes XLA reload
        # the index inside the compiled element loops, which then do not vectorise.)
        diag_r = C_b + C_W * (jnp.sum(xr * xr, axis=1) / d)
        diag_c = diag_r if diagonal else C_b + C_W * (jnp.sum(xc * xc, axis=1) / d)
        # Diagonal entries are floored like the profiles, so that entry (a, a) is the map at
        # K11 = K12 = K22 = max(K_aa, floor) (rho = 1), also for a zero input with C_b = 0.
        on_diagonal = jnp.eye(tile, dtype=bool) if diagonal else None

        def floored(K):
            return K if on_diagonal is None else jnp.where(on_diagonal, jnp.maximum(K, floor), K)

        def segment(carry, coef, length, order):
            if coef is not None:
                coef_r = lax.dynamic_slice_in_dim(coef, i0, tile, axis=2)
                coef_c = lax.dynamic_slice_in_dim(coef, j0, tile, axis=2)

            def layer(carry, step):
                packed, diag_r, diag_c = carry
                K, Theta = jnp.real(packed), jnp.imag(packed)
                diag_r, diag_c = jnp.maximum(diag_r, floor), jnp.maximum(diag_c, floor)
                row = tuple(s[:, None] for s in plan.row_stats(diag_r))
                col = tuple(s[None, :] for s in plan.row_stats(diag_c))
                node_values = ()
                if coef is not None:
                    # This layer's coefficients, selected exactly by a product with a one-hot
                    # vector (a matrix product is not fused into the loops that use its result).
                    pick = (jnp.arange(length) == step).astype(dtype)
                    c_r = jnp.tensordot(pick, coef_r, axes=1, precision=lax.Precision.HIGHEST)
                    c_c = jnp.tensordot(pick, coef_c, axes=1, precision=lax.Precision.HIGHEST)
                    c_c = jnp.swapaxes(c_c, 1, 2)
                    rho = jnp.clip(K * (row[1] * col[1]), -1, 1)
                    # Divided by a traced 1 (exact): a division is an operation XLA will not
                    # duplicate, so each sum is computed once and stored, not recomputed inside
                    # the loop that uses it.
                    node_values = tuple(_mehler_sum(rho, node, c_r, c_c, plan.parities, order) / one
                                        for node in plan.nodes)
                E, Ed = plan.entry(K, row, col, node_values)
                K, Theta = C_b + C_W * E, lambda_b + lambda_W * E + C_W * Ed * Theta
                diag_r = C_b + C_W * plan.diagonal(diag_r)[0]
                diag_c = diag_r if diagonal else C_b + C_W * plan.diagonal(diag_c)[0]
                return (lax.complex(floored(K), Theta), diag_r, diag_c), None

            carry, _ = lax.scan(layer, carry, jnp.arange(length))
            return carry

        # K and Theta travel through the layers as one complex array K + i Theta. XLA on CPU
        # compiles one loop per output array and evaluates in each loop every subexpression it
        # needs (it has no multi-output loops): carried as two arrays, E and Ed (the arccos, the
        # square roots) would be evaluated once for the new K and again for the new Theta.
        # Packed, a layer is one loop that evaluates them once and stores both results.
        carry = (lax.complex(floored(K), Theta), diag_r, diag_c)
        for index, (length, order) in enumerate(segments):
            carry = segment(carry, coefs[index] if plan.nodes else None, length, order)
        K, Theta = jnp.real(carry[0]), jnp.imag(carry[0])
        if diagonal:
            return _symmetrise(K), _symmetrise(Theta)
        return K, Theta

    if mesh is None:
        K_out, T_out = _upper_triangle(tile_maps, padded, tile, dtype, arrays, batch)
    else:
        K_out, T_out = _sharded(tile_maps, mesh, padded, tile, dtype, arrays)
    if padded != n:
        K_out, T_out = K_out[:n, :n], T_out[:n, :n]
    return K_out, T_out, worst_tails


def _upper_triangle(tile_maps, padded: int, tile: int, dtype, arrays, batch: int):
    """The tiles of the upper triangle, each written into the result with its transpose.

    The diagonal tiles (symmetric: written once) and the others (written twice) are separate
    loops, so that neither carries run-time tests for the other's case. Each loop takes ``batch``
    tiles at a time (vmapped: one compiled loop per layer step runs over all of them, which
    amortises its launch and lets XLA split it over cores); a remainder is done one at a time.
    """
    blocks = padded // tile
    rows, cols = np.triu_indices(blocks, 1)
    diagonal = np.arange(blocks)

    def write(out, K, Theta, i0, j0, mirror):
        K_out, T_out = out
        if mirror:
            K_out = lax.dynamic_update_slice(K_out, K.T, (j0, i0))
            T_out = lax.dynamic_update_slice(T_out, Theta.T, (j0, i0))
        K_out = lax.dynamic_update_slice(K_out, K, (i0, j0))
        T_out = lax.dynamic_update_slice(T_out, Theta, (i0, j0))
        return K_out, T_out

    def sweep(out, rows, cols, size, on_diagonal):
        if len(rows) == 0:
            return out
        rows = jnp.asarray((rows * tile).reshape(-1, size))
        cols = jnp.asarray((cols * tile).reshape(-1, size))
        tiles = jax.vmap(lambda i0, j0: tile_maps(i0, j0, arrays, diagonal=on_diagonal))

        def body(t, out):
            K, Theta = tiles(rows[t], cols[t])
            for b in range(size):
                out = write(out, K[b], Theta[b], rows[t, b], cols[t, b], not on_diagonal)
            return out

        return lax.fori_loop(0, rows.shape[0], body, out)

    def sweeps(out, rows, cols, on_diagonal):
        size = min(batch, 2) if len(rows) < 2 * batch else batch
        whole = len(rows) - len(rows) % size
        out = sweep(out, rows[:whole], cols[:whole], size, on_diagonal)
        return sweep(out, rows[whole:], cols[whole:], 1, on_diagonal)

    out = (jnp.zeros((padded, padded), dtype), jnp.zeros((padded, padded), dtype))
    out = sweeps(out, diagonal, diagonal, True)
    return sweeps(out, rows, cols, False)


def _sharded(tile_maps, mesh, padded: int, tile: int, dtype, arrays):
    """The tiles of row stripes, one stripe per device of ``mesh`` (``jax.shard_map``).

    Each device computes every tile of its stripe; a tile below the diagonal is the transpose of
    the tile above it, computed the same way (the same compiled variants for diagonal and other
    tiles), so the result is identical to the one-device loop.
    """
    from jax.sharding import PartitionSpec as P

    devices = mesh.size
    stripe = padded // devices
    blocks = padded // tile
    local_blocks = stripe // tile

    def local(*arrays):
        first = lax.axis_index("rows") * stripe

        def diagonal_tile(i, out):
            K_out, T_out = out
            row = i * tile
            g = first + row
            row = row.astype(g.dtype)
            K, Theta = tile_maps(g, g, arrays, diagonal=True)
            K_out = lax.dynamic_update_slice(K_out, K, (row, g))
            T_out = lax.dynamic_update_slice(T_out, Theta, (row, g))
            return K_out, T_out

        def other_tile(t, out):
            # Tile (i, j) of the stripe for every column block j but the diagonal one.
            K_out, T_out = out
            i, j = t // (blocks - 1), t % (blocks - 1)
            gi = first + i * tile
            gj = (j + (j >= gi // tile)) * tile
            K, Theta = tile_maps(jnp.minimum(gi, gj), jnp.maximum(gi, gj), arrays, diagonal=False)
            flip = gi > gj
            K, Theta = jnp.where(flip, K.T, K), jnp.where(flip, Theta.T, Theta)
            K_out = lax.dynamic_update_slice(K_out, K, (i * tile, gj))
            T_out = lax.dynamic_update_slice(T_out, Theta, (i * tile, gj))
            return K_out, T_out

        zeros = jnp.zeros((stripe, padded), dtype)
        out = lax.fori_loop(0, local_blocks, diagonal_tile, (zeros, zeros))
        return lax.fori_loop(0, local_blocks * (blocks - 1), other_tile, out)

    replicated = tuple(P() for _ in arrays)
    return jax.shard_map(local, mesh=mesh, in_specs=replicated, out_specs=(P("rows"), P("rows")),
                         check_vma=False)(*arrays)


_TILED_CACHE: dict = {}


def _compiler_options() -> dict:
    """XLA options for the tiled loops: on CPU, let LLVM use the widest vectors the machine has
    (XLA defaults to 256-bit vectors; on AVX-512 machines 512-bit ones are ~20% faster here)."""
    if jax.default_backend() != "cpu":
        return {}
    return {"xla_cpu_prefer_vector_width": 512}


def _tiled_function(plan: _Plan, key, nested: bool = False):
    """The jitted tiled method; ``nested`` when called under a JAX transformation (jax.grad, an
    outer jit), where per-compilation options cannot be given."""
    if (key, nested) not in _TILED_CACHE:
        def run(inputs, C_W, C_b, lambda_W, lambda_b, rules, *, depth, tile, mesh, runs, batch):
            return _run_tiled(plan, key, inputs, C_W, C_b, lambda_W, lambda_b, rules, depth=depth, tile=tile,
                              mesh=mesh, runs=runs, batch=batch)

        options = {} if nested else {"compiler_options": _compiler_options()}
        _TILED_CACHE[key, nested] = jax.jit(run, static_argnames=("depth", "tile", "mesh", "runs", "batch"),
                                            **options)
    return _TILED_CACHE[key, nested]


@lru_cache(maxsize=64)
def _diagonal_profile_function(plan: _Plan):
    def run(inputs, C_W, C_b, *, depth):
        return jnp.maximum(_profiles(plan, inputs, C_W, C_b, depth), covariance_floor(inputs.dtype))

    return jax.jit(run, static_argnames=("depth",))


def _numpy_function(f: sp.Expr):
    return lambda z: np.asarray(evaluate_numpy(f, {S.z: z}), dtype=float)


def _layer_order(plan: _Plan, variances: np.ndarray, tol: float, at_least: int = 0) -> int | None:
    """Smallest order in :data:`MEHLER_ORDERS` (and >= ``at_least``) whose tails meet ``tol`` at
    representative variances of one layer (its extremes and quartiles; the run itself then checks
    every row)."""
    probes = np.unique(np.quantile(variances, [0.0, 0.25, 0.5, 0.75, 1.0]))
    functions = [_numpy_function(f) for f in plan.functions]
    for order in (m for m in MEHLER_ORDERS if m >= at_least):
        x, w, table = _hermite_rule(order, _rule_points(order))
        z = np.sqrt(probes)[:, None] * x
        worst = 0.0
        with np.errstate(all="ignore"):
            for f in functions:
                values = np.broadcast_to(f(z), z.shape)
                c = values @ table.T
                norm = np.sum(w * values * values, axis=-1)
                worst = max(worst, float(np.max((norm - np.sum(c * c, axis=-1)) / np.maximum(norm, 1e-300))))
        if worst <= tol:
            return order
    return None


def _runs(orders: Sequence[int]) -> tuple:
    """Consecutive equal orders as (length, order) pairs."""
    runs: list[list[int]] = []
    for order in orders:
        if runs and runs[-1][1] == order:
            runs[-1][0] += 1
        else:
            runs.append([1, order])
    return tuple((length, order) for length, order in runs)


def _mesh(devices):
    if devices is None:
        return None
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        available = jax.devices()
        if not 1 <= devices <= len(available):
            raise DeriveError(f"devices must be between 1 and {len(available)}, got {devices}")
        devices = available[:devices]
    devices = tuple(devices)
    if len(devices) <= 1:
        return None
    from jax.sharding import Mesh

    return Mesh(np.array(devices), ("rows",))
