"""Adding an activation as a rule file, and deriving with it (no Python needed for the activation).

Run: python examples/custom_rules.py
Same from the command line:
    derive kernel --rules examples/my_rules --activation sharp_gelu --param c=2
"""

from pathlib import Path

import derive

rules = str(Path(__file__).with_name("my_rules"))
d = derive.kernel("sharp_gelu", ["c=2"], rule_dirs=[rules])
print("sigma(z) =", d.activation.sigma)
print("closed form:", d.closed_form, "| quadrature order:", d.quadrature_order)
print("<sigma^2>_K =", d.single_expectation)
print("critical initialisation:", derive.criticality(d.activation).critical_points[0])
