"""Universality classes and critical initialisations of several activations, and a phase diagram.

Run: python examples/criticality.py [OUT.png]   (writes tanh-phase.png in the current folder by default)
"""

import sys
from pathlib import Path

import derive
from derive.plots import phase_diagram

for name in ["relu", "leaky_relu", "tanh", "sin", "erf", "gelu", "swish", "softplus"]:
    rep = derive.criticality(name)
    points = ", ".join(f"(C_b={p.C_b:.6g}, C_W={p.C_W:.6g}, K*={p.K_star if p.K_star == p.K_star else 'any':.6})"
                       for p in rep.critical_points)
    extra = f"  a1={float(rep.a1):.4g} b1={float(rep.b1):.4g} p_perp={float(rep.p_perp):.4g}" if rep.cls == "K*=0" else ""
    print(f"{name:>10}: {rep.cls:<15} {points or rep.reason}{extra}")

# A user expression with no critical point gets a reason, not a crash.
print("z**2 + 1:", derive.criticality("z**2 + 1").reason)

tanh = derive.criticality("tanh")
out = Path(sys.argv[1] if len(sys.argv) > 1 else "tanh-phase.png")
phase_diagram(tanh.activation, str(out), critical_points=[p.as_dict() for p in tanh.critical_points], grid=40)
print("wrote", out)
