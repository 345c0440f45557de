"""Predictions of trained networks at infinite width, against finite-width networks trained for real.

A one-dimensional regression task: 12 noisy samples of y = sin(2t) on [-2.5, 2.5], inputs x = (t, 1)
so that the kernel sees position and offset. derive.predict gives, for a tanh network of depth 3,
the Gaussian-process posterior (the NNGP mode, Bayesian inference with the infinitely wide network)
and the infinite ensemble trained by gradient descent on the MSE (the NTK mode) after 30 steps and
at convergence (with the same observation noise as a ridge): mean and two standard deviations over
initialisations. Beside it, 300 networks of
width 128 trained by gradient descent (derive.sampling.training): their ensemble mean and spread at
the same steps, which sit on the infinite-width prediction to within O(1/n).

Run: python examples/predictions.py [OUT.png]     (about 20 s on two cores; writes predictions.png
in the current folder by default)
"""

import sys

import numpy as np

import derive
from derive.backends.codegen import jax_activation
from derive.core.figures import (
    OKABE_ITO,
    InlineFigure,
    error_bars,
    save_figure,
    series_style,
    setting,
    style_axis,
)
from derive.rules.activations import resolve
from derive.sampling.training import train_ensemble

rng = np.random.default_rng(4)
t_train = np.sort(rng.uniform(-2.5, 2.5, 12))
y_train = np.sin(2 * t_train) + 0.05 * rng.standard_normal(12)
t_test = np.linspace(-3.5, 3.5, 141)


def embed(t):
    return np.stack([t, np.ones_like(t)], axis=1)


x_train, x_test = embed(t_train), embed(t_test)
net = dict(depth=3, C_W=1.5, C_b=0.05)
lr, steps = 1.0, 30

gp = derive.predict("tanh", x_train, y_train, x_test, **net, noise=0.05**2, get="nngp")
early = derive.predict("tanh", x_train, y_train, x_test, **net, steps=steps, learning_rate=lr, get="ntk")
converged = derive.predict("tanh", x_train, y_train, x_test, **net, noise=0.05**2, get="ntk")
print(gp, early, converged, sep="\n")

trained = train_ensemble(jax_activation(resolve("tanh")), x_train, y_train, x_test, 3, 128, 1.5, 0.05,
                         steps=[steps], learning_rate=lr, n_networks=300, seed=0, progress=True)
mean, mean_se = trained.mean()
var, _ = trained.variance()
deviation = np.abs(mean[0, :, 0] - early.ntk.mean)
print(f"trained ensemble (width 128, 300 networks) after {steps} steps: |mean - prediction| at most "
      f"{deviation.max():.3f} (standard error of the mean at most {mean_se.max():.3f}; the rest is the O(1/n) "
      f"correction of width 128, which derive.validate_trained extrapolates away over several widths)")

fig = InlineFigure(figsize=(11, 5.2), layout="constrained")
left, right = fig.subplots(1, 2, sharey=True)
for i, (ax, pred, label) in enumerate(((left, gp.nngp, "GP posterior (NNGP, noise $0.05^2$)"),
                                       (left, converged.ntk, "NTK ensemble at convergence (ridge $0.05^2$)"),
                                       (right, early.ntk, f"NTK ensemble after {steps} steps"))):
    sd = np.sqrt(np.maximum(pred.variance, 0))
    style = series_style(i, marker=False)
    ax.plot(t_test, pred.mean, label=label + r": mean $\pm 2\sigma$", **style)
    ax.fill_between(t_test, pred.mean - 2 * sd, pred.mean + 2 * sd, color=style["color"], alpha=0.15, lw=0)
    for edge in (pred.mean - 2 * sd, pred.mean + 2 * sd):  # the band's edges, visible in grey print too
        ax.plot(t_test, edge, color=style["color"], linestyle=style["linestyle"], lw=0.7, alpha=0.8)
sd = np.sqrt(var[0, :, 0])
error_bars(right, t_test[::5], mean[0, ::5, 0], 2 * sd[::5], color="black", marker="o", markersize=4,
           label=r"300 trained networks, width $n = 128$: mean $\pm 2\sigma$")
for ax, title in ((left, "infinite width: Bayesian posterior and trained ensemble"),
                  (right, f"infinite against finite width after {steps} gradient-descent steps")):
    ax.plot(t_train, y_train, "x", color=OKABE_ITO["vermillion"] if ax is right else "black", ms=7, mew=1.8,
            label="training data", zorder=4)
    style_axis(ax, "input $t$ (the network sees $x = (t, 1)$)", "network output $f(x)$", title,
               legend_loc="lower left")
fig.suptitle(f"tanh network: {setting(C_W=net['C_W'], C_b=net['C_b'])}, depth $L = {net['depth']}$, "
             f"learning rate {lr:g}", fontsize=11)
out = sys.argv[1] if len(sys.argv) > 1 else "predictions.png"
save_figure(fig, out, dpi=150)
print(f"wrote {out}")
