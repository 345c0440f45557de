"""The dNTK at order 1/n (PDLT ch. 11): derived recursions for P and Q, their closed form for ReLU at
criticality, and a check against the dNTK of sampled finite-width networks.

E[dH_ijj z_i] = P / n and E[dH_iij z_j] = Q / n (i != j), where dH is the differential of the NTK.
Run: python examples/dntk.py        (about half a minute on two cores)
"""

import numpy as np

from derive import api
from derive.backends.codegen import jax_activation
from derive.finite.single import closed_forms_in_depth, finite_width_maps, iterate
from derive.sampling.dntk import sample_dntk

# ReLU at criticality: P vanishes and Q grows like l^3, so (P + 2Q) / (n Theta^2) grows like l / n.
relu = api.activation("relu")
maps = finite_width_maps(relu)
print("ReLU one-step maps:\n  P' =", maps.recursions["P"], "\n  Q' =", maps.recursions["Q"])
prof = iterate(maps, 8, 2.0, 0.0)
closed = closed_forms_in_depth(maps, 2.0, 0.0, 2.0, 0.0, float(prof.values["K"][0]), float(prof.values["Theta"][0]))
print("closed forms in l:  P(l) =", closed["P"], "   Q(l) =", closed["Q"])

# tanh through quadrature, against sampled networks of widths 16, 32, 64 (the 1/n fit takes the
# O(1/n^2) terms out of the deepest layer).
depth, cw, cb = 3, 1.5, 0.1
tanh = api.activation("tanh")
theory = iterate(finite_width_maps(tanh), depth, cw, cb)
sigma = jax_activation(tanh)
widths = (16, 32, 64)
runs = [sample_dntk(sigma, depth, n, cw, cb, n_networks=800, seed=k) for k, n in enumerate(widths)]
for q in ("P", "Q"):
    for layer in (2, 3):
        est = [r.estimate(q) for r in runs]
        y = np.array([e[0][layer - 2] for e in est])
        se = np.array([e[1][layer - 2] for e in est])
        X = np.stack([np.ones(len(widths)), 1.0 / np.asarray(widths, float)], axis=1)
        W = np.diag(1 / se**2)
        cov = np.linalg.inv(X.T @ W @ X)
        a = (cov @ X.T @ W @ y)[0]
        t = theory.values[q][layer - 1]
        print(f"tanh {q} layer {layer}: theory {t:+.4f}   sampled, extrapolated in 1/n {a:+.4f} +- "
              f"{np.sqrt(cov[0, 0]):.4f}   (z = {(a - t) / np.sqrt(cov[0, 0]):+.2f})")
