"""Finite-width corrections of pre-LN transformer blocks, derived from the layer rules and checked
against sampled transformers.

Blocks x + attention(LN(x)) and x + MLP(LN(x)) with tied query/key weights (Dinan, Yaida & Zhang's
recommended variances) on one input of three tokens. The engine derives, token pair by token pair,
the four-point vertex V and the NLO kernel G1 of the residual stream (derive/finite/tensor.py):
LayerNorm's statistics, the skip's cross term and each head's own logit and value means all enter.
The relative fluctuation V/(n K^2) levels off block after block (the stream's kernel grows linearly
and its vertex with it); the number of heads H leaves V alone and moves G1 (each head's logits
average over n/H channels).

Run: python examples/transformer_finite_width.py        (about a minute on two cores)
"""

import numpy as np

import derive
from derive import arch
from derive.validation.arch import check_finite_width


def blocks(depth: int, heads: int):
    return arch.serial(arch.dense(1.0, label="embedding"), arch.repeat(depth, arch.serial(
        arch.residual(arch.layer_norm(), arch.attention(heads=heads, C_Q=0.5, C_K=0.5, C_V=0.5, C_O=1 / 3)),
        arch.residual(arch.layer_norm(), arch.dense(0.4), arch.activation("gelu"), arch.dense(1.6))),
        label="block"))


x = np.random.default_rng(1).standard_normal((1, 3, 4))  # one input, three tokens
width = 256
print(f"V/(n K^2) of token 1 and G1/(n K) of the token pair (1, 2), width {width}")
print(f"{'output':12s} {'H=1: V/nK^2':>12s} {'G1/nK':>9s} {'H=4: V/nK^2':>12s} {'G1/nK':>9s}")
one, four = (derive.finite_width(blocks(4, h), inputs=x) for h in (1, 4))
for label, K, V1, G1, V4, G4 in zip(one.labels, one.values["K"], one.values["V"], one.values["G1"],
                                    four.values["V"], four.values["G1"]):
    print(f"{label:12s} {V1[0, 0, 0, 0] / (width * K[0, 0]**2):12.5f} {G1[0, 1] / (width * K[0, 1]):9.5f} "
          f"{V4[0, 0, 0, 0] / (width * K[0, 0]**2):12.5f} {G4[0, 1] / (width * K[0, 1]):9.5f}")

print("\nTwo blocks of two heads against sampled transformers at widths 32, 64, 128 (1/n fit):")
check = check_finite_width(blocks(2, 2), (32, 64, 128), samples=3000, seed=0, inputs=x, progress=True)
for r in check.rows:
    if r["layer"].startswith("block[2]") and r["quantity"] in ("K", "V"):
        print(f"  {r['quantity']:2s} tokens {r['entry']}: theory {r['theory']:8.4f}  sampled {r['estimate']:8.4f}"
              f" +- {r['stderr']:.4f}  z = {r['z']:5.2f}")
print("passed" if check.passed else "FAILED", f"(largest |z| = {abs(check.worst['z']):.2f})")
