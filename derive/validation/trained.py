"""Infinite-width predictions against ensembles of trained finite-width networks.

At each width n of ``widths``, S networks (:func:`derive.sampling.training.train_ensemble`) are
trained by ``steps`` steps of gradient descent on the MSE; at every checkpoint the ensemble mean and
variance of each test output are measured with standard errors (s / sqrt(S); for the variance
sqrt((m4 - s^4) / S)). To order 1/n

    E[f_n(x)] = mean_inf(x) + b/n,       Var[f_n(x)] = var_inf(x) + b'/n,

so a weighted fit a + b/n over the widths (:func:`derive.sampling.estimators.fit_inverse_width`)
gives the infinite-width intercept a with its standard error, compared with the prediction of
:func:`derive.inference.infinite` at the same step count (mode "ntk": every layer trained; "nngp":
only the last layer, the wrong dynamics for these networks, which a run with power rejects): z =
(a - theory) / se(a). The slope b is the measured 1/n coefficient, reported with its error. Every
row states the smallest deviation the run could detect (z_max standard errors of the intercept), so
that a check without power shows as one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from derive.backends.precision import float64
from derive.core import budget
from derive.core.errors import DeriveError
from derive.sampling.estimators import fit_inverse_width, z_score

#: What is compared per test output.
QUANTITIES = ("mean", "variance")


@dataclass(frozen=True)
class TrainedRow:
    quantity: str
    step: int
    point: int
    output: int
    theory: float
    intercept: float
    intercept_stderr: float
    slope: float
    slope_stderr: float
    chi2: float
    dof: int
    z: float
    detectable: float
    estimates: tuple
    stderrs: tuple

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class TrainedValidation:
    """Rows per (quantity, checkpoint, test point, output); ``passed`` when every |z| < ``z_max``."""

    rows: tuple
    widths: tuple
    n_networks: int
    steps: tuple
    learning_rate: float
    mode: str
    z_max: float
    final_loss: dict
    #: The network, for the figure's title: activation, depth, C_W, C_b (set by
    #: :func:`validate_trained_dense`; not part of :meth:`to_dict`).
    network: tuple = ()

    @property
    def passed(self) -> bool:
        return all(abs(r.z) < self.z_max for r in self.rows)

    @property
    def worst(self) -> TrainedRow:
        return max(self.rows, key=lambda r: abs(r.z))

    def to_dict(self) -> dict:
        return {"passed": self.passed, "mode": self.mode, "widths": list(self.widths),
                "n_networks": self.n_networks, "steps": list(self.steps), "learning_rate": self.learning_rate,
                "z_max": self.z_max, "final_training_loss": {str(k): v for k, v in self.final_loss.items()},
                "rows": [r.as_dict() for r in self.rows]}

    def __repr__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        w = self.worst
        return (f"TrainedValidation({verdict}: {len(self.rows)} comparisons against the {self.mode} prediction, "
                f"widths {list(self.widths)}, {self.n_networks} networks each; worst |z| = {abs(w.z):.2f} "
                f"({w.quantity}, step {w.step}, point {w.point}))")

    def table(self) -> list[str]:
        """Text rows within 80 columns."""
        head = f"{'quantity':<9}{'step':>6}{'pt':>4}{'theory':>12}{'fit n->inf':>12}{'+-':>10}{'z':>7}{'5 se':>10}"
        lines = [head.replace("5 se", f"{self.z_max:g} se")]
        for r in self.rows:
            lines.append(f"{r.quantity:<9}{r.step:>6}{r.point:>4}{r.theory:>12.5g}{r.intercept:>12.5g}"
                         f"{r.intercept_stderr:>10.2g}{r.z:>7.2f}{r.detectable:>10.2g}")
        return lines

    def _repr_markdown_(self) -> str:
        verdict = "passed" if self.passed else "**failed**"
        lines = [f"**Trained ensembles against the infinite-width `{self.mode}` prediction**: {verdict} "
                 f"(widths {list(self.widths)}, {self.n_networks} networks each, learning rate "
                 f"{self.learning_rate:g})", "",
                 "| quantity | step | point | theory | fit n→∞ | ± | z | 1/n slope |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.quantity} | {r.step} | {r.point} | {r.theory:.6g} | {r.intercept:.6g} | "
                         f"{r.intercept_stderr:.2g} | {r.z:.2f} | {r.slope:.3g} ± {r.slope_stderr:.2g} |")
        return "\n".join(lines)

    def plot(self, out: str | None = None, points: int = 4, step: int | None = None):
        """Deviation of the ensemble mean and variance from the infinite-width prediction against 1/n
        for the first ``points`` test points (output 0) at one checkpoint (default: the one with the
        largest |z|): estimates with error bars, the fit a + b/n, zero = the prediction. Returns the
        matplotlib Figure (made without pyplot); saved to ``out`` (.png, .pdf, .svg) when given."""
        from matplotlib.lines import Line2D

        from derive.core.figures import (
            InlineFigure,
            error_bars,
            reference_line,
            save_figure,
            series_style,
            setting,
            style_axis,
        )

        step = self.worst.step if step is None else step
        fig = InlineFigure(figsize=(11, 5.2), layout="constrained")
        axes = fig.subplots(1, 2)
        inv = 1.0 / np.asarray(self.widths, dtype=float)
        grid = np.linspace(0.0, inv.max() * 1.05, 50)
        for ax, quantity in zip(axes, QUANTITIES):
            rows = [r for r in self.rows if r.quantity == quantity and r.step == step and r.output == 0][:points]
            for k, r in enumerate(rows):
                dodge = (k - (len(rows) - 1) / 2) * 0.012 * inv.max()  # side by side, not on top
                error_bars(ax, inv + dodge, np.asarray(r.estimates) - r.theory, r.stderrs, k,
                           label=f"test point {r.point}: $z = {r.z:.1f}$")
                error_bars(ax, [dodge], [r.intercept - r.theory], [r.intercept_stderr], k, hollow=True, marker="D",
                           markersize=6.5)
                style = series_style(k, marker=False)
                ax.plot(grid, r.intercept - r.theory + r.slope * grid, color=style["color"],
                        linestyle=style["linestyle"], lw=1.2, zorder=2)
            handles = ax.get_legend_handles_labels()[0]
            handles += [Line2D([], [], color="#4D4D4D", lw=1.2, label=r"lines: weighted fits $a + b/n$"),
                        Line2D([], [], ls="", marker="D", mfc="white", mec="#4D4D4D", ms=6.5,
                               label=r"fitted intercept $a$ at $1/n = 0$ ($\pm 1$ s.e.)"),
                        reference_line(ax, y=0.0, label=f"infinite-width prediction ({self.mode})")]
            ticks = [0.0, *sorted(inv)]
            ax.set_xticks(ticks, labels=["0"] + [f"1/{n}" for n in sorted(self.widths, reverse=True)])
            ax.set_xlim(-0.06 * inv.max(), inv.max() * 1.06)
            symbol = r"\mathbb{E}[f(x)]" if quantity == "mean" else r"\mathrm{Var}[f(x)]"
            style_axis(ax, r"inverse hidden width $1/n$", rf"${symbol}_{{\,n}} - {symbol}_{{\,\infty}}$",
                       f"ensemble {quantity} minus the prediction, after {step} steps", legend=False)
            ax.legend(handles=handles, fontsize=7.5, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                      framealpha=1.0, edgecolor="#BFBFBF")
        verdict = "agree" if self.passed else "DISAGREE"
        network = dict(self.network)
        title = ", ".join(t for t in (setting(C_W=network.get("C_W"), C_b=network.get("C_b")),
                                      f"depth $L = {network['depth']}$" if "depth" in network else "") if t)
        name = f"{network['activation']} network" + (f": {title}" if title else "") if "activation" in network \
            else "Trained ensembles"
        fig.suptitle(f"{name}; widths $n = {', '.join(map(str, self.widths))}$, {self.n_networks} networks per "
                     f"width, learning rate {self.learning_rate:g}\n"
                     f"trained ensembles and the infinite-width prediction {verdict} (largest $|z| = "
                     f"{abs(self.worst.z):.2f}$ at step {self.worst.step})", fontsize=10)
        if out is not None:
            save_figure(fig, out, dpi=150)
        return fig


def compare(ensembles: Sequence, theory, *, mode: str, z_max: float, learning_rate: float) -> TrainedValidation:
    """Rows from trained ensembles (one per width, the same checkpoints) and the infinite-width
    :class:`~derive.inference.predict.Prediction` at those step counts."""
    widths = tuple(e.width for e in ensembles)
    steps = ensembles[0].checkpoints
    estimates = {"mean": [e.mean() for e in ensembles], "variance": [e.variance() for e in ensembles]}
    g = theory[mode]
    expected = {"mean": np.asarray(g.mean), "variance": np.asarray(g.variance)}
    rows = []
    for quantity in QUANTITIES:
        values = np.stack([v for v, _ in estimates[quantity]])  # (widths, checkpoints, M, k)
        errors = np.stack([s for _, s in estimates[quantity]])
        _, T, M, K = values.shape
        for c in range(T):
            for i in range(M):
                for j in range(K):
                    th = expected[quantity][c, i, j] if expected[quantity].ndim == 3 else expected[quantity][c, i]
                    y, s = values[:, c, i, j], errors[:, c, i, j]
                    fit = fit_inverse_width(widths, y, np.maximum(s, 1e-300))  # the fit needs s > 0
                    z = z_score(fit.intercept, fit.intercept_stderr, float(th))
                    rows.append(TrainedRow(quantity, int(steps[c]), i, j, float(th), fit.intercept,
                                           fit.intercept_stderr, fit.slope, fit.slope_stderr, fit.chi2, fit.dof,
                                           float(z), z_max * fit.intercept_stderr, tuple(map(float, y)),
                                           tuple(map(float, s))))
    final_loss = {e.width: float(np.mean(e.losses[:, -1])) for e in ensembles}
    return TrainedValidation(tuple(rows), widths, ensembles[0].n_networks, tuple(steps), float(learning_rate),
                             mode, float(z_max), final_loss)


@float64
def validate_trained_dense(activation, x_train, y_train, x_test, depth: int, C_W: float, C_b: float,
                           lambda_W: float, lambda_b: float, *, widths: Sequence[int], n_networks: int,
                           steps: Sequence[int], learning_rate: float, seed: int, mode: str, z_max: float,
                           progress: Callable[[str], None] | None = None) -> TrainedValidation:
    """Train ensembles of the dense network of ``activation`` at each width and compare (module
    docstring). ``activation`` is an :class:`~derive.rules.activations.Activation`."""
    from derive.arch.description import dense_network
    from derive.backends.codegen import jax_activation
    from derive.inference.predict import predict_network
    from derive.sampling.training import train_ensemble

    widths = tuple(int(w) for w in widths)
    if len(widths) < 3 or len(set(widths)) != len(widths) or min(widths) < 1:
        raise DeriveError(f"widths must be at least three distinct positive widths (a 1/n fit with a check "
                          f"of its own), got {list(widths)}")
    if mode not in ("nngp", "ntk"):
        raise DeriveError(f"mode must be 'ntk' (every layer trained) or 'nngp' (the last layer only), got {mode!r}")
    steps = tuple(int(s) for s in np.atleast_1d(steps))
    shape, outputs = np.shape(x_train), int(np.prod(np.shape(y_train)[1:]))
    if len(shape) == 2 and steps and isinstance(n_networks, (int, np.integer)):
        cost = [budget.training(n_networks, (shape[1],) + (w,) * (int(depth) - 1) + (outputs,), shape[0],
                                len(x_test), max(steps)) for w in widths]
        budget.check(budget.Estimate(f"training {n_networks} networks at each of the widths "
                                     f"{', '.join(map(str, widths))} for {max(steps)} steps",
                                     sum(c.ops for c in cost), max(c.bytes for c in cost)))
    net = dense_network(activation, depth, C_W, C_b, lambda_W, lambda_b)
    y = np.asarray(y_train, dtype=float)
    y2 = y.reshape(-1, 1) if y.ndim == 1 else y  # the comparison runs on (M, k) arrays
    theory = predict_network(net, x_train, y2, x_test, steps=list(steps), learning_rate=learning_rate,
                             get=(mode,), covariance="diagonal")
    sigma = jax_activation(activation)
    ensembles = []
    for w in widths:
        if callable(progress):
            progress(f"training {n_networks} networks of width {w}")
        ensembles.append(train_ensemble(sigma, x_train, y2, x_test, depth, w, C_W, C_b, lambda_W, lambda_b,
                                        steps=steps, learning_rate=learning_rate, n_networks=n_networks,
                                        seed=seed + 7919 * w, progress=progress is True))
    result = compare(ensembles, theory, mode=mode, z_max=z_max, learning_rate=learning_rate)
    name = getattr(activation, "name", str(activation))
    return replace(result, network=(("activation", name), ("depth", int(depth)), ("C_W", C_W), ("C_b", C_b)))


__all__ = ["QUANTITIES", "TrainedRow", "TrainedValidation", "compare", "validate_trained_dense"]
