"""Check a hand derivation of the ReLU kernel: one right (written differently), two wrong.

The arc-cosine kernel of ReLU (Cho & Saul 2009), as one often writes it by hand,

    <relu(z1) relu(z2)>_K = sqrt(K11 K22) / (2 pi) [sin(theta) + (pi - theta) cos(theta)],
    theta = arccos(K12 / sqrt(K11 K22)),

looks nothing like the engine's form (-K12 acos(rho)/(2 pi) + K12/2 + sqrt(K11 K22 - K12^2)/(2 pi)),
yet it is the same function. `derive.check` says so three ways: symbolically, at 30-digit precision
on the domain and its edges, and against sampled Gaussians. It then catches two classic slips: a
factor 2 (forgetting the 1/2 in front) and a dropped sin(theta) term.

Run: python examples/check_hand_derivation.py      (about 10 s; the sampling uses JAX)
The same from the shell:
    derive check -a relu -q expectation --define '\\theta=\\arccos(\\rho)' \\
        --claim-latex '\\frac{\\sqrt{K_{11}K_{22}}}{2\\pi}(\\sin\\theta + (\\pi-\\theta)\\cos\\theta)'
"""

import derive

THETA = r"\theta = \arccos\left(\frac{K_{12}}{\sqrt{K_{11}K_{22}}}\right)"

# 1. Right, in LaTeX with a helper definition for theta: equal by all three verdicts.
right = derive.check(
    "relu", "expectation",
    latex=r"\frac{\sqrt{K_{11}K_{22}}}{2\pi}\left(\sin\theta + (\pi-\theta)\cos\theta\right)",
    definitions=[THETA], empirical=True)
print(right.to_text(), end="\n\n")
assert right.verdict == "equal"

# 2. Wrong by a factor 2: the hint names the factor, the report the point of largest error.
factor = derive.check(
    "relu", "expectation",
    latex=r"\frac{\sqrt{K_{11}K_{22}}}{\pi}\left(\sin\theta + (\pi-\theta)\cos\theta\right)",
    definitions=[THETA])
print(factor.to_text(), end="\n\n")
assert factor.verdict == "not-equal"

# 3. The sin(theta) term dropped, written in SymPy syntax with the built-in theta: the hint names the
#    missing term of the derivation, and sampling (which never looks at the derivation) agrees.
missing = derive.check("relu", "expectation", "sqrt(K11*K22)/(2*pi)*(pi - theta)*cos(theta)", empirical=True)
print(missing.to_text(), end="\n\n")
assert missing.verdict == "not-equal"

# 4. Several claims at once, from a TOML file (here written on the fly).
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

text = r'''
activation = "relu"
[claims]
single_input = "C_b + C_W*K/2"
chi_perp = "C_W/2"
[claims.latex]
derivative_expectation = '\frac{\pi - \theta}{2\pi}'
[definitions.latex]
theta = '\arccos(\rho)'
'''
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "relu_claims.toml"
    path.write_text(text)
    many = derive.check(file=path)
print(many.to_text())
assert many.verdict == "equal"
