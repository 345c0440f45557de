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
from matplotlib.figure import Figure

import derive
from derive.backends.codegen import jax_activation
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

fig = Figure(figsize=(10, 4), layout="constrained")
left, right = fig.subplots(1, 2, sharey=True)
for ax, pred, label, colour in ((left, gp.nngp, "GP posterior (NNGP, noise 0.05²)", "#0072B2"),
                                (left, converged.ntk, "NTK ensemble at convergence (ridge 0.05²)", "#D55E00"),
                                (right, early.ntk, f"NTK ensemble after {steps} steps", "#009E73")):
    sd = np.sqrt(np.maximum(pred.variance, 0))
    ax.plot(t_test, pred.mean, color=colour, lw=1.5, label=label + r" (mean $\pm 2\sigma$)")
    ax.fill_between(t_test, pred.mean - 2 * sd, pred.mean + 2 * sd, color=colour, alpha=0.18, lw=0)
sd = np.sqrt(var[0, :, 0])
right.errorbar(t_test[::5], mean[0, ::5, 0], yerr=2 * sd[::5], fmt="o", ms=3, color="black", capsize=2, lw=0.8,
               label=r"300 trained networks, width 128 (mean $\pm 2\sigma$)")
for ax in (left, right):
    ax.plot(t_train, y_train, "x", color="black", ms=7, mew=1.5, label="training data")
    ax.set_xlabel("input $t$ (the network sees $x = (t, 1)$)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
left.set_ylabel("network output $f(x)$")
left.set_title("infinitely wide tanh network, depth 3", fontsize=10)
right.set_title(f"infinite width against finite width, {steps} gradient-descent steps", fontsize=10)
out = sys.argv[1] if len(sys.argv) > 1 else "predictions.png"
fig.savefig(out, dpi=150)
print(f"wrote {out}")
