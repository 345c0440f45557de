"""Theory against sampled finite-width networks: z-scores per layer and quantity, and 1/n extrapolation.

:func:`validate` derives the infinite-width kernel K^(l) and NTK Theta^(l) of a set of inputs with
the engine (:func:`derive.api.kernel`, :func:`derive.kernels.gram.gram_profile`), samples S dense networks
of the same activation at one or several uniform widths n (:func:`derive.sampling.dense.sample_kernels`,
n_1 = ... = n_L = n), estimates each requested quantity with a standard error
(:mod:`derive.sampling.estimators`), and reports

    z = (estimate - theory) / stderr

per layer, input pair (or input) and width. Sampled networks differ from infinite width by
O(l/n) relative corrections (PDLT = Roberts, Yaida & Hanin, *The Principles of Deep Learning
Theory*, ch. 4-5, 8-9), so a single-width check is meaningful when that bias is small against the
standard error, about (l/n) sqrt(S n) << 1. With several widths, each entry's estimates are fitted
by weighted least squares to a + b/n (:func:`derive.sampling.estimators.fit_inverse_width`); the intercept
a, reported with width "1/n->0", is compared with the infinite-width theory, and the slope b is the
1/n coefficient (G1 on the kernel's diagonal). Per-width rows then still carry a z-score, but it
includes the O(1/n) bias by design, and only the extrapolated rows decide ``passed``.

The networks at width n use the seed ``SeedSequence([seed, n])`` (NumPy), so every width has its
own independent networks, reproducible from ``seed`` and n alone. (Seeding every width with the
same key would make them correlated: JAX's counter-based generator gives a 64 x 64 matrix the same
numbers as the first 4096 entries of a 128 x 128 one.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from derive.backends.codegen import jax_activation
from derive.backends.precision import float64
from derive.core import budget
from derive.core.display import (
    markdown_table,
    markdown_text,
    number,
    quantity_cell,
    rounded,
    verdict,
    worst_z,
)
from derive.core.errors import DeriveError
from derive.core.inputs import check_hyperparameters, check_inputs
from derive.rules.activations import as_activation
from derive.sampling.estimators import fit_inverse_width, z_score
from derive.symbolic.recursions import derive_kernel, numeric_kernel_expressions
from derive.validation.quantities import QUANTITIES, Quantity, Setup, quantity_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["validate", "ValidationReport", "plot_validation", "default_inputs", "weak_quantities", "EXTRAPOLATED"]

#: The ``width`` of rows that hold the extrapolation to infinite width.
EXTRAPOLATED = "1/n->0"


def default_inputs() -> np.ndarray:
    """Three fixed inputs in d = 8: standard normal draws from NumPy's ``default_rng(0)``."""
    return np.random.default_rng(0).standard_normal((3, 8))


def _finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


@dataclass(frozen=True, repr=False)
class ValidationReport:
    """Theory against Monte Carlo for one activation and initialisation.

    ``results`` is a list of rows (dicts) with keys ``quantity``, ``layer``, ``inputs`` (0-based
    input indices), ``width`` (an int, or ``"1/n->0"`` for the extrapolated intercept, which also
    has ``slope``, ``slope_stderr``, ``chi2`` and ``dof``), ``theory``, ``estimate``, ``stderr``,
    ``z`` (None without a theory), ``checked`` (whether the row decides :attr:`passed`),
    ``detectable`` (z_max standard errors: the smallest deviation the row could detect) and ``weak``
    (true when even a deviation as large as the theory value would pass: no power).
    ``method`` is the sampler ("weights" or "conditional").
    """

    activation: str
    widths: tuple[int, ...]
    samples: int
    seed: int
    depth: int
    C_W: float
    C_b: float
    lambda_W: float
    lambda_b: float
    quantities: tuple[str, ...]
    z_max: float
    inputs: np.ndarray
    results: list[dict] = field(default_factory=list)
    method: str = "weights"

    @property
    def passed(self) -> bool:
        """Every checked z-score is finite with |z| < z_max (rows without a theory do not count)."""
        return all(r["z"] is None or (np.isfinite(r["z"]) and abs(r["z"]) < self.z_max)
                   for r in self.results if r["checked"])

    @property
    def worst(self) -> dict | None:
        """The checked row with the largest |z| (non-finite first), or None."""
        rows = [r for r in self.results if r["checked"] and r["z"] is not None]
        if not rows:
            return None
        return max(rows, key=lambda r: np.inf if not np.isfinite(r["z"]) else abs(r["z"]))

    def as_dict(self) -> dict:
        """A JSON-ready dict: activation, widths, samples, seed, results, and the setup.

        Non-finite numbers (an infinite z from a zero standard error) become null; such a row has
        ``passed`` false.
        """
        rows = []
        for r in self.results:
            row = {k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in r.items()}
            if r["z"] is not None:
                row["passed"] = bool(np.isfinite(r["z"]) and abs(r["z"]) < self.z_max)
            rows.append(row)
        return {
            "activation": self.activation,
            "widths": list(self.widths),
            "samples": self.samples,
            "seed": self.seed,
            "depth": self.depth,
            "C_W": self.C_W,
            "C_b": self.C_b,
            "lambda_W": self.lambda_W,
            "lambda_b": self.lambda_b,
            "quantities": list(self.quantities),
            "z_max": self.z_max,
            "method": self.method,
            "inputs": self.inputs.tolist(),
            "passed": self.passed,
            "results": rows,
        }

    def plot(self, out: str | None = None) -> Figure:
        """The figure of :func:`plot_validation`, saved to ``out`` when given; returns the matplotlib
        Figure."""
        return plot_validation(self, out)

    def _widths(self) -> str:
        return f"width {self.widths[0]}" if len(self.widths) == 1 else f"widths {list(self.widths)}"

    def __repr__(self) -> str:
        return (f"ValidationReport({self.activation}, depth {self.depth}: {verdict(self.passed)}; "
                f"{len(self.results)} rows of {', '.join(self.quantities)}, {self.samples} networks at "
                f"{self._widths()}{worst_z(self.worst)})")

    def _repr_markdown_(self) -> str:
        w = self.worst
        fits = any(r["width"] == EXTRAPOLATED for r in self.results)
        worst = "" if w is None else (f"; worst $z$ = {rounded(w['z'], 3)} ({markdown_text(w['quantity'])}, layer {w['layer']}, "
                                      f"inputs {tuple(w['inputs'])}, width {_width_text(w['width'])})")
        head = (f"**Validation of {markdown_text(self.activation)}** against {self.samples} sampled networks at {self._widths()} "
                f"(depth {self.depth}, $C_W$ = {self.C_W}, $C_b$ = {self.C_b}, $\\lambda_W$ = {self.lambda_W}, "
                f"$\\lambda_b$ = {self.lambda_b}; {self.method} sampler, seed {self.seed}): "
                f"{verdict(self.passed, markdown=True)}, every checked "
                f"$\\lvert z\\rvert < {self.z_max:g}$ with $z = (\\text{{estimate}} - \\text{{theory}})/"
                f"\\text{{stderr}}${worst}")
        legend = ("Rows at width n→∞ are the intercepts of weighted fits $a + b/n$ over the widths (they decide the "
                  "verdict; the per-width rows carry the O(1/n) bias). " if fits else "")
        legend += ("*weak*: a deviation as large as the theory itself would pass; *not checked*: the row does not "
                   "decide the verdict.")
        header = ["quantity", "layer", "inputs", "width", "theory", "estimate", "±", "z", ""]
        if fits:
            header.insert(8, "1/n slope")
        rows = []
        for r in self.results:
            note = "not checked" if not r["checked"] else ("weak" if r.get("weak") else "")
            row = [quantity_cell(r["quantity"]), r["layer"], ", ".join(map(str, r["inputs"])),
                   _width_text(r["width"]), r["theory"], r["estimate"],
                   rounded(r["stderr"]), rounded(r["z"], 3), note]
            if fits:
                row.insert(8, f"{number(r['slope'])} ± {rounded(r['slope_stderr'])}" if "slope" in r else "")
            rows.append(row)
        return "\n".join([head, "", legend, "", markdown_table(header, rows)])


def _width_text(width) -> str:
    return "n→∞" if width == EXTRAPOLATED else str(width)


# ----------------------------------------------------------------------------------------------
# Checks of the arguments


def work_estimate(shape: tuple[int, int], depth: int, widths: Sequence[int], samples: int, *,
                  ntk: bool = True, dntk: bool = False, conditional: bool = False) -> budget.Estimate:
    """The cost of :func:`validate`: ``samples`` networks at each of ``widths``
    (:func:`derive.core.budget.monte_carlo`), and for the dNTK quantities about 4 n second-order passes
    per network and input."""
    N, d = shape
    ops = 0.0
    for n in widths:
        ops += budget.dense_monte_carlo(samples, d, n, N, depth=depth, ntk=ntk, conditional=conditional).ops
        if dntk:
            pairs = float(d) * n + (float(depth) - 1) * float(n) ** 2
            ops += float(samples) * N * 4 * n * 2 * pairs
    what = (f"validate: {samples} networks per width at width{'s' if len(widths) > 1 else ''} "
            f"{', '.join(map(str, widths))}, depth {depth}, {N} inputs")
    return budget.Estimate(what, ops, budget.gram(N, depth, stored_layers=depth, whole_matrices=True).bytes)


def _check_widths(width, widths) -> tuple[int, ...]:
    chosen = [] if width is None else [width]
    chosen += [] if widths is None else list(widths)
    if not chosen:
        raise DeriveError("give a width (or several widths for the 1/n extrapolation)")
    for n in chosen:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise DeriveError(f"widths must be integers >= 1, got {n!r}")
    return tuple(sorted({int(n) for n in chosen}))


def _check_quantities(quantities, registry: Mapping[str, Quantity]) -> tuple[str, ...]:
    if isinstance(quantities, str):
        quantities = [q for q in quantities.split(",") if q.strip()]
    names = tuple(dict.fromkeys(q.strip() for q in quantities))
    if not names:
        raise DeriveError("give at least one quantity")
    unknown = [q for q in names if q not in registry]
    if unknown:
        raise DeriveError(f"unknown quantity {', '.join(unknown)}; known: {', '.join(registry)}")
    return names


def _width_seed(seed: int, width: int) -> int:
    return int(np.random.SeedSequence([seed, width]).generate_state(1, np.uint32)[0])


def _progress_reporter(progress, total: int):
    """(callback(done), close()) for ``progress``: False, True (:func:`derive.core.progress.bar` on
    stderr) or a callable(done, total)."""
    from derive.core.progress import stage

    return stage(progress, "sampling networks", total, lambda p: (lambda done: p(done, total)))


# ----------------------------------------------------------------------------------------------
# The check


@float64
def validate(
    activation,
    C_W: float,
    C_b: float,
    depth: int,
    width: int | None = None,
    widths: Sequence[int] | None = None,
    samples: int = 1000,
    seed: int = 0,
    quantities: Sequence[str] | str = ("K", "Theta"),
    inputs=None,
    lambda_W: float | None = None,
    lambda_b: float | None = None,
    params: Mapping[str, str] | Sequence[str] | None = None,
    z_max: float = 5.0,
    progress: bool | Callable[[int, int], None] = False,
    *,
    fit_order: int = 1,
    registry: Mapping[str, Quantity] | None = None,
    chunk: int | None = None,
    method: str = "weights",
) -> ValidationReport:
    """Compare the derived statistics of a dense network with sampled finite-width networks.

    Args:
        activation: a rule name (``"relu"``), an expression in z, or an Activation.
        C_W, C_b: W ~ N(0, C_W / n_{l-1}), b ~ N(0, C_b).
        depth: L, the number of dense layers.
        width, widths: the uniform width n (n_1 = ... = n_L = n), or several for the 1/n fit;
            given together, all of them are used.
        samples: S >= 2 networks per width.
        seed: integer seed (module docstring for how widths are seeded).
        quantities: names in the registry (default :data:`derive.validation.quantities.QUANTITIES`): "K"
            (kernel per layer, all input pairs), "Theta" (output NTK, all pairs), "V", "G1" and
            "Theta_var" (leading-order finite-width statistics per single input, their theory from
            :mod:`derive.finite.single`; at one width they carry O(1/n) relative corrections),
            "dNTK_P" and "dNTK_Q" (the dNTK's correlations with the preactivations, from
            :func:`derive.sampling.dntk.sample_dntk`, which samples its own networks per input, for
            layers 2..L; they need depth >= 2 and cost about 2 n second-order passes per network).
        inputs: (N, d) array of inputs (default :func:`default_inputs`).
        lambda_W, lambda_b: NTK learning-rate factors (default C_W, C_b).
        params: activation parameters (``{"a": "0.2"}`` or ``["a=0.2"]``).
        z_max: a checked |z| >= z_max fails the report.
        progress: True for a progress bar on stderr, or a callable(done, total) over networks.
        fit_order: 1 fits a + b/n, 2 fits a + b/n + c/n^2 (needs >= 3 widths).
        registry: the quantities by name (default :data:`derive.validation.quantities.QUANTITIES`).
        chunk: networks per step of the sampler (default: bounded by memory).
        method: "weights" samples networks weight by weight; "conditional" draws each layer's
            preactivations from their exact Gaussian law given the previous layer (same
            distribution, far fewer random numbers; forward quantities only, not Theta or Theta_var).

    Returns:
        A :class:`ValidationReport`.

    Example:
        >>> from derive.validation.validate import validate
        >>> report = validate("relu", 2.0, 0.1, depth=3, width=128, samples=200)  # doctest: +SKIP
        >>> report.passed  # doctest: +SKIP
        True
    """
    registry = QUANTITIES if registry is None else registry
    C_W, C_b, lambda_W, lambda_b = check_hyperparameters(C_W, C_b, lambda_W, lambda_b, depth)
    depth = int(depth)
    chosen = _check_widths(width, widths)
    names = _check_quantities(quantities, registry)
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 2:
        raise DeriveError(f"samples must be an integer >= 2, got {samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DeriveError(f"seed must be a non-negative integer, got {seed!r}")
    if not (np.isfinite(z_max) and z_max > 0):
        raise DeriveError(f"z_max must be a positive number, got {z_max}")
    if fit_order not in (1, 2):
        raise DeriveError(f"fit_order must be 1 or 2, got {fit_order}")
    if method not in ("weights", "conditional"):
        raise DeriveError(f"method must be 'weights' or 'conditional', got {method!r}")
    if 1 < len(chosen) < fit_order + 1:
        raise DeriveError(f"a fit of order {fit_order} in 1/n needs at least {fit_order + 1} widths")
    x = default_inputs() if inputs is None else check_inputs(inputs)
    selected = [registry[q] for q in names]
    budget.check(work_estimate(x.shape, depth, chosen, int(samples), ntk=any(q.needs_ntk for q in selected),
                               dntk=any(q.needs_dntk for q in selected), conditional=method == "conditional"))

    act = as_activation(activation, params)
    expectation, derivative = numeric_kernel_expressions(derive_kernel(act))
    from derive.kernels.gram import gram_profile
    from derive.sampling.dense import sample_kernels

    kernel, ntk = (np.asarray(a) for a in gram_profile(expectation, derivative, x, depth, C_W, C_b,
                                                        lambda_W, lambda_b))
    sigma = jax_activation(act)
    needs_ntk = any(q.needs_ntk for q in selected)
    if any(q.needs_dntk for q in selected) and depth < 2:
        raise DeriveError("the dNTK quantities need depth >= 2 (the first layer's dNTK is zero)")
    if needs_ntk and method == "conditional":
        raise DeriveError("the NTK quantities (Theta, Theta_var) need sampled weights: use method 'weights'")

    report, close = _progress_reporter(progress, samples * len(chosen))
    rows: list[dict] = []
    try:
        for i, n in enumerate(chosen):
            done = i * samples
            step = None if report is None else (lambda k, done=done: report(done + k))
            result = sample_kernels(sigma, x, depth, n, C_W, C_b, lambda_W, lambda_b,
                                    n_networks=int(samples), seed=_width_seed(int(seed), n), ntk=needs_ntk,
                                    chunk=chunk, method=method, progress=step)
            dntk = None
            if any(q.needs_dntk for q in selected):
                from derive.sampling.dntk import sample_dntk

                dntk = [sample_dntk(sigma, depth, n, C_W, C_b, lambda_W, lambda_b, x=xa, n_networks=int(samples),
                                    seed=_width_seed(int(seed) + 1 + a, n)) for a, xa in enumerate(x)]
            setup = Setup(result.widths, C_W, C_b, lambda_W, lambda_b, x, kernel, ntk, act, dntk)
            for q in selected:
                for row in quantity_rows(q, result, setup):
                    rows.append({**row, "width": n, "checked": len(chosen) == 1})
    finally:
        close()
    if len(chosen) > 1:
        fits = _extrapolate(rows, chosen, fit_order)
        fitted = {(r["quantity"], r["layer"], tuple(r["inputs"])) for r in fits}
        for r in rows:  # an entry that cannot be fitted (zero stderr) is checked width by width
            r["checked"] = (r["quantity"], r["layer"], tuple(r["inputs"])) not in fitted
        rows += fits
    for r in rows:
        _power(r, float(z_max))
    order = {q: k for k, q in enumerate(names)}
    rows.sort(key=lambda r: (order[r["quantity"]], r["width"] == EXTRAPOLATED, r["layer"], r["inputs"],
                             0 if r["width"] == EXTRAPOLATED else r["width"]))
    return ValidationReport(act.name, chosen, int(samples), int(seed), depth, C_W, C_b, lambda_W, lambda_b,
                            names, float(z_max), x, rows, method)


def _power(row: dict, z_max: float) -> None:
    """``detectable``: the smallest deviation from the theory this row could detect, z_max standard
    errors; ``weak``: true when a deviation as large as the theory value itself would still pass (a
    check without power; None where the theory is zero or absent)."""
    detectable = z_max * row["stderr"] if np.isfinite(row["stderr"]) else None
    row["detectable"] = detectable
    theory = row["theory"]
    row["weak"] = None if theory in (None, 0.0) or detectable is None else bool(detectable >= abs(theory))


def weak_quantities(report: ValidationReport) -> dict[str, tuple[int, int]]:
    """Quantities with checked rows that have no power: name -> (weak rows, checked rows)."""
    out: dict[str, list[int]] = {}
    for r in report.results:
        if r["checked"] and r.get("weak") is not None:
            counts = out.setdefault(r["quantity"], [0, 0])
            counts[0] += bool(r["weak"])
            counts[1] += 1
    return {q: (w, n) for q, (w, n) in out.items() if w}


def _extrapolate(rows: list[dict], widths: tuple[int, ...], order: int) -> list[dict]:
    """One "1/n->0" row per quantity, layer and entry estimated at every width with stderr > 0."""
    groups: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        groups.setdefault((r["quantity"], r["layer"], tuple(r["inputs"])), {})[r["width"]] = r
    out = []
    for (quantity, layer, entry), by_width in groups.items():
        points = [by_width[n] for n in widths if n in by_width]
        if len(points) != len(widths):
            continue
        est = np.array([p["estimate"] for p in points])
        se = np.array([p["stderr"] for p in points])
        if not (np.all(np.isfinite(est)) and np.all(np.isfinite(se)) and np.all(se > 0)):
            continue
        fit = fit_inverse_width(widths, est, se, order)
        theory = points[-1]["theory"]
        out.append({"quantity": quantity, "layer": layer, "inputs": list(entry), "width": EXTRAPOLATED,
                    "theory": theory, "estimate": fit.intercept, "stderr": fit.intercept_stderr,
                    "z": z_score(fit.intercept, fit.intercept_stderr, theory), "checked": True,
                    "slope": fit.slope, "slope_stderr": fit.slope_stderr, "chi2": fit.chi2, "dof": fit.dof})
        if order == 2:
            out[-1].update(curvature=float(fit.coefficients[2]),
                           curvature_stderr=float(np.sqrt(fit.covariance[2, 2])))
    return out


# ----------------------------------------------------------------------------------------------
# Figure


#: Symbol (mathtext, without $) and description of each built-in quantity in the figure.
_SYMBOLS = {"K": ("K", r"kernel $K^{(\ell)}_{ab}$"), "Theta": (r"\Theta", r"output NTK $\Theta^{(L)}_{ab}$"),
            "V": ("V", r"four-point vertex $V^{(\ell)}$"), "G1": (r"G^{\{1\}}", r"NLO kernel $G^{\{1\}(\ell)}$"),
            "Theta_var": (r"n\,\mathrm{Var}\,\Theta", r"NTK fluctuation $n\,\mathrm{Var}(\Theta^{(L)})$"),
            "dNTK_P": ("P", r"dNTK correlation $P^{(\ell)}$"), "dNTK_Q": ("Q", r"dNTK correlation $Q^{(\ell)}$")}


def _symbol(quantity: str) -> tuple[str, str]:
    """(symbol, description) of ``quantity`` for labels; a registered quantity goes by its name."""
    return _SYMBOLS.get(quantity, (r"\mathrm{" + quantity.replace("_", r"\_") + "}", quantity))


def _entry_label(entry) -> str:
    return "$(" + ", ".join(f"x_{a}" for a in entry) + ")$" if len(entry) > 1 else f"$x_{entry[0]}$"


def _y_label(quantity: str, deviation: bool) -> str:
    s = _symbol(quantity)[0]
    return rf"${s}_{{\mathrm{{MC}}}} - {s}_{{\mathrm{{theory}}}}$" if deviation else rf"${s}$ (Monte Carlo)"


def plot_validation(report: ValidationReport, out: str | None = None) -> Figure:
    """One row of panels per quantity. Left: Monte Carlo minus theory at every reported layer, for
    every input or input pair (colours) and width (markers), with +-1 standard-error bars, zero being
    the theory; with several widths, right: the same at the last reported layer against 1/n, with the
    weighted fit a + b/n and its intercept at 1/n = 0 (the value checked). A quantity without a theory
    shows its estimates instead. Returns the matplotlib Figure (made without pyplot), saved to ``out``
    (.png, .pdf, .svg) when given."""
    from derive.core.figures import InlineFigure, save_figure, setting

    by_quantity: dict[str, list[dict]] = {}
    for r in report.results:
        by_quantity.setdefault(r["quantity"], []).append(r)
    several = len(report.widths) > 1
    ncols = 2 if several else 1
    nrows = max(1, len(by_quantity))
    fig = InlineFigure(figsize=(6.6 * ncols if several else 8.0, 4.6 * nrows + 0.9), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for row_axes, (quantity, rows) in zip(axes, by_quantity.items()):
        _plot_against_depth(row_axes[0], quantity, rows, report.widths)
        if several:
            _plot_inverse_width(row_axes[1], quantity, rows, report.widths)
    widths = ", ".join(map(str, report.widths))
    fig.suptitle(f"{report.activation} network: {setting(C_W=report.C_W, C_b=report.C_b)}, depth $L = {report.depth}$, "
                 f"width{'s' if several else ''} $n = {widths}$, {report.samples} sampled networks"
                 f"{' per width' if several else ''}\n"
                 r"Monte Carlo estimates with $\pm 1$ standard error, which at a finite width include the "
                 r"$O(1/n)$ correction" + (r";" "\n" r"the intercept at $1/n = 0$ is what is checked"
                                           if several else ""), fontsize=10)
    if out is not None:
        save_figure(fig, out, dpi=120)
    return fig


#: Markers of the widths (the diamond marks the fitted intercept at 1/n = 0).
def _width_marker(j: int) -> str:
    from derive.core.figures import MARKERS

    markers = [m for m in MARKERS if m != "D"]
    return markers[j % len(markers)]


def _legend_below(ax, handles, columns: int) -> None:
    ax.legend(handles=handles, fontsize=7.5, ncol=columns, loc="upper center", bbox_to_anchor=(0.5, -0.16),
              framealpha=1.0, edgecolor="#BFBFBF", handlelength=2.4)


def _plot_against_depth(ax, quantity: str, rows: list[dict], widths: tuple[int, ...]) -> None:
    """Monte Carlo minus theory (or the estimates, without a theory) against the layer: a colour per
    entry, a marker per width, side by side within each layer."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from derive.core.figures import PALETTE, error_bars, reference_line, style_axis

    rows = [r for r in rows if r["width"] != EXTRAPOLATED]
    entries = sorted({tuple(r["inputs"]) for r in rows})
    deviation = all(r["theory"] is not None for r in rows)
    slots = len(entries) * len(widths)
    spread = min(0.8, 0.1 * (slots - 1))
    offsets = np.linspace(-spread / 2, spread / 2, slots) if slots > 1 else [0.0]
    handles = []
    for k, entry in enumerate(entries):
        for j, n in enumerate(widths):
            pts = [r for r in rows if tuple(r["inputs"]) == entry and r["width"] == n]
            if not pts:
                continue
            y = [r["estimate"] - (r["theory"] if deviation else 0.0) for r in pts]
            error_bars(ax, [r["layer"] + offsets[k * len(widths) + j] for r in pts], y, [r["stderr"] for r in pts],
                       color=PALETTE[k % len(PALETTE)], marker=_width_marker(j), markersize=5)
        handles.append(Line2D([], [], color=PALETTE[k % len(PALETTE)], lw=2.5, label=_entry_label(entry)))
    if len(widths) > 1:
        handles += [Line2D([], [], ls="", marker=_width_marker(j), color="#4D4D4D", label=f"$n = {n}$")
                    for j, n in enumerate(widths)]
    if deviation:
        handles.append(reference_line(ax, y=0.0, label="theory"))
    layers = sorted({r["layer"] for r in rows})
    ax.set_xticks(layers)
    if len(layers) > 12:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    description = _symbol(quantity)[1]
    what = r"Monte Carlo $-$ theory" if deviation else "Monte Carlo (no theory)"
    style_axis(ax, r"layer $\ell$", _y_label(quantity, deviation), f"{description}: {what}", legend=False)
    _legend_below(ax, handles, 4)


def _plot_inverse_width(ax, quantity: str, rows: list[dict], widths: tuple[int, ...]) -> None:
    """At the last reported layer: Monte Carlo minus theory against 1/n for every entry, the weighted
    fit a + b/n (lines, one line style per entry) and its intercept a with its error at 1/n = 0 (open
    diamonds)."""
    from matplotlib.lines import Line2D

    from derive.core.figures import error_bars, reference_line, series_style, style_axis

    layer = max(r["layer"] for r in rows)
    inv = 1.0 / np.asarray(widths, dtype=float)
    grid = np.linspace(0.0, inv.max() * 1.05, 50)
    entries = sorted({tuple(r["inputs"]) for r in rows})
    deviation = all(r["theory"] is not None for r in rows if r["layer"] == layer)
    handles = []
    for k, entry in enumerate(entries):
        mine = {r["width"]: r for r in rows if r["layer"] == layer and tuple(r["inputs"]) == entry}
        pts = [mine[n] for n in widths if n in mine]
        fit = mine.get(EXTRAPOLATED)
        theory = next((r["theory"] for r in pts), None) if fit is None else fit["theory"]
        shift = theory if deviation else 0.0
        dodge = (k - (len(entries) - 1) / 2) * 0.018 * inv.max()  # side by side, not on top
        for j, n in enumerate(widths):
            if n in mine:
                error_bars(ax, [1.0 / n + dodge], [mine[n]["estimate"] - shift], [mine[n]["stderr"]], k,
                           marker=_width_marker(j), markersize=5)
        style = series_style(k, marker=False)
        label = _entry_label(entry) + (f": theory {theory:.4g}" if theory is not None else "")
        handles.append(Line2D([], [], color=style["color"], linestyle=style["linestyle"], lw=1.6, label=label))
        if fit is not None:
            ax.plot(grid, fit["estimate"] - shift + fit["slope"] * grid + fit.get("curvature", 0.0) * grid**2,
                    color=style["color"], linestyle=style["linestyle"], lw=1.2, zorder=2)
            error_bars(ax, [dodge], [fit["estimate"] - shift], [fit["stderr"]], k, hollow=True, marker="D",
                       markersize=6.5)
    handles += [Line2D([], [], ls="", marker=_width_marker(j), color="#4D4D4D", label=f"$n = {n}$")
                for j, n in enumerate(widths)]
    handles += [Line2D([], [], color="#4D4D4D", lw=1.2, label=r"lines: weighted fits $a + b/n$"),
                Line2D([], [], ls="", marker="D", mfc="white", mec="#4D4D4D", ms=6.5,
                       label=r"fitted intercept $a$ at $1/n = 0$")]
    if deviation:
        handles.append(reference_line(ax, y=0.0, label="theory"))
    ticks = [0.0, *sorted(inv)]
    ax.set_xticks(ticks, labels=["0"] + [f"1/{n}" for n in sorted(widths, reverse=True)])
    ax.set_xlim(-0.06 * inv.max(), inv.max() * 1.06)
    what = r"Monte Carlo $-$ theory" if deviation else "Monte Carlo (no theory)"
    style_axis(ax, r"inverse width $1/n$", _y_label(quantity, deviation),
               rf"{_symbol(quantity)[1]} at layer $\ell = {layer}$: {what} against $1/n$", legend=False)
    _legend_below(ax, handles, 3)
